"""A knowledge base: its store, its two-level index, and the operations on them."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ingest.pipeline import FileItem, ingest, items_from_paths
from ingest.store import DocStore
from kb.paths import check_kb_name
from kb.settings import Settings
from retrieval.embedder import Embedder
from retrieval.index import IndexDir, LoadedIndex, sync_index
from retrieval.search import Hit, Reranker, fuse, to_units
from retrieval.vector import gpu_backend, torch_from_faiss

log = logging.getLogger(__name__)


class NoSuchKB(LookupError):
    """The knowledge base does not exist."""


@lru_cache(maxsize=4)
def shared_embedder(spec: str, device: str, batch_size: int) -> Embedder:
    """One embedder per model and device in a process (the server holds many KBs)."""
    return Embedder(spec, device, batch_size)


@lru_cache(maxsize=2)
def shared_reranker(spec: str, device: str) -> Reranker:
    return Reranker(spec, device)


def list_kbs(settings: Settings) -> list[dict]:
    out = []
    home = Path(settings.home)
    if home.is_dir():
        for d in sorted(p for p in home.iterdir() if (p / "store.sqlite").is_file()):
            with DocStore.for_kb(d) as store:
                c = store.counts()
            out.append({"name": d.name, "documents": c["documents"], "chunks": c["chunks"]})
    return out


class KnowledgeBase:
    def __init__(self, settings: Settings, name: str, create: bool = False) -> None:
        self.settings = settings
        self.name = check_kb_name(name)
        self.dir = settings.kb_dir(name)
        if not create and not (self.dir / "store.sqlite").is_file():
            raise NoSuchKB(f"no knowledge base {name!r} under {settings.home}")
        self._lock = threading.RLock()
        self._live: LoadedIndex | None = None
        self._gpu = None

    # model access -------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        m, r = self.settings.models, self.settings.retrieval
        return shared_embedder(m.embedder, m.device, r.embed_batch_size)

    def store(self) -> DocStore:
        return DocStore.for_kb(self.dir)

    # writes -------------------------------------------------------------------------------------
    def add_paths(self, paths: Sequence[str | Path], progress: bool = True) -> dict:
        items, missing = items_from_paths(paths)
        return self.add_items(items, missing, progress)

    def add_items(self, items: Sequence[FileItem], failed: list[dict] | None = None, progress: bool = True,
                  on_file: Callable[[str, str], None] | None = None) -> dict:
        """Ingest files, then bring the index up to date."""
        with self._lock:
            report = ingest(items, self.name, self.settings, progress=progress, on_file=on_file, failed=failed)
            out = report.to_json()
            out["index"] = self.sync(progress)
            return out

    def documents(self) -> list[dict]:
        """The KB's documents: doc_id, source, path, title, n_chunks."""
        with self.store() as store:
            return [{"doc_id": d.doc_id, "source": d.source, "path": d.path, "title": d.title,
                     "n_chunks": d.n_chunks} for d in store.documents()]

    def document(self, doc_id: str) -> dict | None:
        return next((d for d in self.documents() if d["doc_id"] == doc_id), None)

    def remove_document(self, doc_id: str) -> bool:
        with self._lock:
            with self.store() as store:
                removed = store.delete_document(doc_id)
            if removed:
                self.sync(False)
            return removed

    def delete(self) -> None:
        with self._lock:
            shutil.rmtree(self.dir)
            self._live = None

    def sync(self, progress: bool = False) -> dict:
        with self._lock, self.store() as store:
            info = sync_index(store, self.dir, self.settings.retrieval, self.embedder, progress)
            self._live = None
            return info

    # reads --------------------------------------------------------------------------------------
    def _index(self) -> LoadedIndex | None:
        idir = IndexDir(self.dir)
        gen = idir.current()
        if self._live is None or self._live.gen != gen:
            with self._lock:
                self._live = idir.load(self.settings.retrieval, self.embedder.model_id)
                self._gpu = None
                backend = gpu_backend(self.settings.retrieval.backend)
                if self._live is not None and backend == "torch":
                    import torch

                    device = "cuda" if torch.cuda.is_available() else "cpu"
                    self._gpu = torch_from_faiss(self._live.vectors, device)
                elif self._live is not None and backend == "faiss":
                    self._live.vectors.to_gpu()
        return self._live

    def search(self, query: str, k: int = 5) -> list[Hit]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5) -> list[list[Hit]]:
        """Hybrid search for many queries (the embedding is batched)."""
        cfg = self.settings.retrieval
        live = self._index()
        if live is None or not queries:
            return [[] for _ in queries]
        qv = self.embedder.encode_queries(list(queries))
        # trust the vector list as far as the embedder's vocabulary covers the query
        cover = self.embedder.coverage(list(queries)) if cfg.coverage_weighting else np.ones(len(queries))
        vec_index = self._gpu if self._gpu is not None else live.vectors
        vscores, vids = vec_index.search(qv, cfg.candidates)
        results = []
        with self.store() as store:
            for qi, query in enumerate(queries):
                vec = [(int(i), float(s)) for i, s in zip(vids[qi], vscores[qi]) if i >= 0]
                kw = live.keywords.search(query, cfg.candidates) if (cfg.hybrid and live.keywords) else []
                ranked = [[i for i, _ in vec]]
                weights = [cfg.vector_weight * float(cover[qi])]
                raw = [[s for _, s in vec]]
                if kw:
                    ranked.append([i for i, _ in kw])
                    weights.append(cfg.keyword_weight)
                    raw.append([s for _, s in kw])
                fused = fuse(ranked, weights, cfg.fusion, cfg.rrf_k, raw)
                rows = store.key_infos(ki_ids=list(fused))
                hits = to_units(rows, fused, store, cfg, dict(vec), dict(kw))
                if cfg.rerank and self.settings.models.reranker:
                    rr = shared_reranker(self.settings.models.reranker, self.settings.models.device)
                    hits = rr.rerank(query, hits[: cfg.rerank_candidates])
                results.append(hits[:k])
        return results

    def stats(self) -> dict:
        with self.store() as store:
            c = store.counts()
        live = IndexDir(self.dir).current()
        return {"name": self.name, **c, "index_generation": live}


