"""A knowledge base: its store, its two-level index, and the operations on them.

Writes (ingest, document removal, reindex, deletion) hold the KB's write lock (kb/writelock.py)
across processes: one writer at a time, the others wait. Reads take no lock: they use the index
generation CURRENT names and one read snapshot of the store.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from ingest.pipeline import FileItem, ingest, items_from_paths
from ingest.store import DocStore
from kb import faults
from kb.paths import check_kb_name
from kb.settings import Settings
from kb.writelock import write_lock
from retrieval.embedder import Embedder
from retrieval.index import IndexDir, IndexMismatchError, LoadedIndex, sync_index
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
        for d in sorted(p for p in home.iterdir() if not p.name.startswith(".") and (p / "store.sqlite").is_file()):
            try:
                with DocStore.for_kb(d, create=False) as store:
                    c = store.counts()
            except FileNotFoundError:  # deleted meanwhile
                continue
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

    def store(self, create: bool = False) -> DocStore:
        """The KB's store; NoSuchKB when it was deleted (writers that create it pass `create`)."""
        try:
            return DocStore.for_kb(self.dir, create)
        except FileNotFoundError as e:
            raise NoSuchKB(f"no knowledge base {self.name!r} under {self.settings.home}") from e

    # writes -------------------------------------------------------------------------------------
    @contextmanager
    def writing(self, create: bool = False) -> Iterator[None]:
        """Hold the KB's write lock (between processes and threads; reentrant) for a write.
        NoSuchKB when the KB is gone (deleted while waiting) unless `create`."""
        missing = NoSuchKB(f"no knowledge base {self.name!r} under {self.settings.home}")
        with ExitStack() as stack:
            try:
                stack.enter_context(write_lock(self.dir, self.settings.retrieval.write_lock_timeout_s, create))
            except FileNotFoundError as e:
                raise missing from e
            if not create and not (self.dir / "store.sqlite").is_file():
                raise missing
            yield

    def add_paths(self, paths: Sequence[str | Path], progress: bool = True) -> dict:
        items, missing = items_from_paths(paths)
        return self.add_items(items, missing, progress)

    def add_items(self, items: Sequence[FileItem], failed: list[dict] | None = None, progress: bool = True,
                  on_file: Callable[[str, str], None] | None = None) -> dict:
        """Ingest files, then bring the index up to date (under the write lock)."""
        with self.writing(create=True):
            report = ingest(items, self.name, self.settings, progress=progress, on_file=on_file, failed=failed)
            out = report.to_json()
            faults.point("kb.before_sync")
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
        """Delete a document from the store, then from the index (under the write lock)."""
        with self.writing():
            with self.store() as store:
                removed = store.delete_document(doc_id)
            if removed:
                faults.point("kb.after_delete")
                self.sync(False)
            return removed

    def delete(self) -> None:
        """Delete the KB: its folder is renamed away in one step (a kill leaves the KB whole or
        gone, never half), then removed; writers waiting for its lock see it gone."""
        with self.writing():
            trash = self.dir.with_name(f".deleted-{self.name}-{secrets.token_hex(4)}")
            self.dir.rename(trash)
            with self._lock:
                self._live = None
                self._gpu = None
        shutil.rmtree(trash, ignore_errors=True)
        for old in self.dir.parent.glob(".deleted-*"):  # left by a delete killed before its rmtree
            shutil.rmtree(old, ignore_errors=True)

    def sync(self, progress: bool = False, rebuild: bool = False) -> dict:
        """Bring the index in line with the store (see retrieval.index.sync_index)."""
        with self.writing(), self.store() as store:
            info = sync_index(store, self.dir, self.settings.retrieval, self.embedder, progress, rebuild)
        with self._lock:
            self._live = None
        return info

    def reindex(self, progress: bool = False) -> dict:
        """Rebuild the index from scratch with the configured embedder beside the live one and
        swap it in; the live index answers until then and stays when the rebuild fails."""
        return self.sync(progress, rebuild=True)

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
        use_vec = cfg.search != "keyword"
        use_kw = cfg.uses_keywords and live.keywords is not None
        if cfg.uses_keywords and live.keywords is None:
            raise IndexMismatchError(f"retrieval.search is {cfg.search!r}, but the index of {self.name!r} was built "
                                     f"without its BM25 side: run `kb reindex --kb {self.name}`")
        if use_vec:
            qv = self.embedder.encode_queries(list(queries))
            # trust the vector list as far as the embedder's vocabulary covers the query
            cover = self.embedder.coverage(list(queries)) if cfg.coverage_weighting else np.ones(len(queries))
            vec_index = self._gpu if self._gpu is not None else live.vectors
            vscores, vids = vec_index.search(qv, cfg.candidates)
        results = []
        with self.store() as opened, opened.snapshot() as store:
            for qi, query in enumerate(queries):
                vec = [(int(i), float(s)) for i, s in zip(vids[qi], vscores[qi]) if i >= 0] if use_vec else []
                kw = live.keywords.search(query, cfg.candidates) if use_kw else []
                ranked, weights, raw = [], [], []
                if vec:
                    ranked.append([i for i, _ in vec])
                    weights.append(cfg.vector_weight * float(cover[qi]))
                    raw.append([s for _, s in vec])
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


