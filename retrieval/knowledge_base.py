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
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np

from ingest.pipeline import FileItem, ingest, items_from_paths
from ingest.store import DocStore, open_store
from kb import faults
from kb.errors import InvalidRequest, NotFound
from kb.paths import check_kb_name
from kb.settings import Settings
from kb.writelock import write_lock
from retrieval.embedder import Embedder
from retrieval.index import IndexDir, IndexMismatchError, LoadedIndex, sync_index
from retrieval.search import Hit, Reranker, fuse, level2_hits
from retrieval.vector import gpu_backend, torch_from_faiss

log = logging.getLogger(__name__)


class NoSuchKB(NotFound, LookupError):
    """The knowledge base does not exist."""


class NoSuchChunk(NotFound, LookupError):
    """The document, or the chunk of it, does not exist in the knowledge base."""


class BadChunkText(InvalidRequest, ValueError):
    """A chunk edit's text (or user) is empty or too long."""


MAX_CHUNK_TEXT = 20_000
"""The longest text (characters) an edited chunk may have."""
MAX_USER = 200
"""The longest user name an edit is recorded with."""


def check_edit(text: str, user: str) -> tuple[str, str]:
    """The edit's text and user, stripped; BadChunkText when either is empty, too long or not
    Unicode text that can be stored (a lone surrogate)."""
    if not isinstance(text, str) or not text.strip():
        raise BadChunkText("the chunk's new text is empty")
    if not isinstance(user, str) or not user.strip():
        raise BadChunkText("an edit needs the user who makes it")
    try:
        text.encode("utf-8")
        user.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadChunkText("the chunk's new text or user is not valid Unicode text") from e
    if len(text.strip()) > MAX_CHUNK_TEXT:
        raise BadChunkText(f"the chunk's new text has {len(text.strip())} characters; at most {MAX_CHUNK_TEXT}")
    if len(user.strip()) > MAX_USER:
        raise BadChunkText(f"the user name is over {MAX_USER} characters")
    return text.strip(), user.strip()


def chunk_ord(doc_id: str, chunk: int | str) -> int:
    """A chunk's ord from its ord (int or digits) or its chunk_id; NoSuchChunk for anything else."""
    if isinstance(chunk, int) and not isinstance(chunk, bool):
        ord_ = chunk
    elif isinstance(chunk, str) and chunk.strip().isdecimal():
        ord_ = int(chunk)
    elif isinstance(chunk, str) and chunk.startswith(f"{doc_id}-") and chunk[len(doc_id) + 1:].isdecimal():
        ord_ = int(chunk[len(doc_id) + 1:])
    else:
        raise NoSuchChunk(f"no chunk {chunk!r} in document {doc_id!r} (give its ord or chunk_id)")
    if ord_ < 0:
        raise NoSuchChunk(f"no chunk {chunk!r} in document {doc_id!r}")
    return ord_


def iso_time(ts: float) -> str:
    """A timestamp as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def key_info_json(row: dict) -> dict:
    """The public fields of one stored key-info entry (the raw text only for sentences)."""
    out = {k: row[k] for k in ("level", "ord", "title_path", "key_text", "keywords", "entities", "summary")}
    if row["level"] == "sentence":
        out["text"] = row["raw_text"]
    return out


@lru_cache(maxsize=4)
def shared_embedder(spec: str, device: str, batch_size: int) -> Embedder:
    """One embedder per model and device in a process (the server holds many KBs)."""
    return Embedder(spec, device, batch_size)


@lru_cache(maxsize=2)
def shared_reranker(spec: str, device: str) -> Reranker:
    """One reranker per model and device in a process."""
    return Reranker(spec, device)


def kb_names(settings: Settings) -> list[str]:
    """The knowledge bases there are: in the shared store, or the folders under `settings.home`
    that hold a store."""
    if settings.store.shared:
        from ingest import pgstore

        return pgstore.kb_names(settings.store)
    home = Path(settings.home)
    if not home.is_dir():
        return []
    return sorted(p.name for p in home.iterdir() if not p.name.startswith(".") and (p / "store.sqlite").is_file())


def list_kbs(settings: Settings) -> list[dict]:
    """Name, document and chunk counts of each knowledge base."""
    out = []
    for name in kb_names(settings):
        try:
            with open_store(settings, name, create=False) as store:
                c = store.counts()
        except FileNotFoundError:  # deleted meanwhile
            continue
        out.append({"name": name, "documents": c["documents"], "chunks": c["chunks"]})
    return out


def kb_exists(settings: Settings, name: str) -> bool:
    """Whether knowledge base `name` exists (its store does)."""
    if settings.store.shared:
        from ingest import pgstore

        return pgstore.exists(settings.store, name)
    return (settings.kb_dir(name) / "store.sqlite").is_file()


class KnowledgeBase:
    def __init__(self, settings: Settings, name: str, create: bool = False) -> None:
        self.settings = settings
        self.name = check_kb_name(name)
        self.dir = settings.kb_dir(name)
        self._born = self._birth()
        if not create and self._born is None:
            raise NoSuchKB(self._missing())
        self._lock = threading.RLock()
        self._live: LoadedIndex | None = None
        self._refused: tuple | None = None
        self._level1 = None
        self._gpu = None

    # model access -------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        m, r = self.settings.models, self.settings.retrieval
        return shared_embedder(m.embedder, m.device, r.embed_batch_size)

    def store(self, create: bool = False) -> DocStore:
        """The KB's store; NoSuchKB when it was deleted (writers that create it pass `create`)."""
        try:
            return open_store(self.settings, self.name, create)
        except FileNotFoundError as e:
            raise NoSuchKB(self._missing()) from e

    def exists(self) -> bool:
        """Whether the KB exists now (another process may have deleted or created it)."""
        return kb_exists(self.settings, self.name)

    def _birth(self) -> str | None:
        """What tells this KB from a later one of the same name: its creation time in the shared
        store, or its store's random id (a store of the first releases has none until its first
        write: then "" stands for it); None when it does not exist."""
        if self.settings.store.shared:
            from ingest import pgstore

            born = pgstore.created_at(self.settings.store, self.name)
            return None if born is None else repr(born)
        try:
            with DocStore.for_kb(self.dir, create=False) as store:
                return store.store_id(create=False) or ""
        except FileNotFoundError:
            return None

    def is_current(self) -> bool:
        """Whether the KB this object opened still exists and is the same one (not deleted, and
        not deleted and created again by another process or host since)."""
        born = self._birth()
        if self._born is None:  # opened to create: it is this KB from its first write on
            self._born = born
        return born is not None and born == self._born

    def _missing(self) -> str:
        where = "the shared store" if self.settings.store.shared else self.settings.home
        return f"no knowledge base {self.name!r} in {where}"

    # writes -------------------------------------------------------------------------------------
    @contextmanager
    def writing(self, create: bool = False) -> Iterator[None]:
        """Hold the KB's write lock (between processes and threads; reentrant) for a write.
        NoSuchKB when the KB is gone (deleted while waiting) unless `create`."""
        missing = NoSuchKB(self._missing())
        timeout = self.settings.retrieval.write_lock_timeout_s
        with ExitStack() as stack:
            if self.settings.store.shared:
                from ingest.pgstore import kb_write_lock

                stack.enter_context(kb_write_lock(self.settings.store, self.name, timeout))
            else:
                try:
                    stack.enter_context(write_lock(self.dir, timeout, create))
                except FileNotFoundError as e:
                    raise missing from e
            if not create and not self.exists():
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

    def chunks(self, doc_id: str) -> dict:
        """A document's chunks with their key information (segment and sentence entries: level,
        key_text, keywords, entities, summary) and the last edit of each, plus the document's
        article key information. NoSuchChunk when the KB has no such document."""
        with self.store() as opened, opened.snapshot() as store:
            doc = store.get_document(doc_id)
            if doc is None:
                raise NoSuchChunk(f"no document {doc_id!r} in knowledge base {self.name!r}")
            rows, kis, edited = store.chunks(doc_id), store.key_infos(doc_id), store.edited(doc_id)
        by_chunk: dict[str | None, list[dict]] = {}
        for k in kis:
            by_chunk.setdefault(k["chunk_id"], []).append(key_info_json(k))
        chunks = []
        for r in rows:
            own = by_chunk.get(r["chunk_id"], [])
            edit = edited.get(r["chunk_id"])
            chunks.append({"chunk_id": r["chunk_id"], "ord": r["ord"], "text": r["text"], "title_path": r["title_path"],
                           "page": r["page"], "key_info": next((k for k in own if k["level"] == "segment"), None),
                           "sentences": [k for k in own if k["level"] == "sentence"],
                           "edited": None if edit is None else {"edit_id": edit["edit_id"], "user": edit["user"],
                                                                "at": iso_time(edit["at"])}})
        article = next((k for k in by_chunk.get(None, []) if k["level"] == "article"), None)
        return {"kb": self.name, "doc_id": doc.doc_id, "source": doc.source, "title": doc.title,
                "n_chunks": doc.n_chunks, "article": article, "chunks": chunks}

    def chunk_edits(self, doc_id: str | None = None) -> list[dict]:
        """The audit of chunk edits (who, when, before, after), oldest first."""
        with self.store() as store:
            return [{**e, "at": iso_time(e["at"])} for e in store.chunk_edits(doc_id)]

    def edit_chunk(self, doc_id: str, chunk: int | str, text: str, user: str) -> dict:
        """Replace the text of chunk `chunk` (its ord, or its chunk_id) of document `doc_id`, as
        `user`: re-extract the chunk's segment and sentence key information and the document's
        article key information, audit the edit, then bring the index in line (under the write
        lock). The store takes the edit in one transaction and the index sync is repeatable, so a
        kill between them leaves the KB consistent (the next write's sync adds the new entries).
        BadChunkText for empty or oversized text; NoSuchChunk for an unknown document or chunk."""
        from ingest.keyinfo import build_extractor
        from ingest.sentences import split_sentences
        from ingest.types import Chunk, ParsedDocument

        text, user = check_edit(text, user)
        with self.writing():
            with self.store() as store:
                doc = store.get_document(doc_id)
                if doc is None:
                    raise NoSuchChunk(f"no document {doc_id!r} in knowledge base {self.name!r}")
                ord_ = chunk_ord(doc_id, chunk)
                rows = store.chunks(doc_id)
                old = next((r for r in rows if r["ord"] == ord_), None)
                if old is None:
                    raise NoSuchChunk(f"no chunk {chunk!r} in document {doc_id!r} ({len(rows)} chunks, ords "
                                      f"0-{len(rows) - 1})")
                out = {"kb": self.name, "doc_id": doc_id, "chunk_id": old["chunk_id"], "ord": ord_, "user": user}
                if old["text"] == text:  # nothing to change; the sync completes an edit killed before it
                    return {**out, "changed": False, "edit_id": None, "at": None, "index": self.sync(False)}
                chunks = [Chunk(text if r["ord"] == ord_ else r["text"], r["ord"], tuple(r["title_path"]), r["page"],
                                split_sentences(text) if r["ord"] == ord_ else []) for r in rows]
                parsed = ParsedDocument(doc.path, doc.source, doc.doc_id, doc.content_hash, [], doc.title)
                kis = [k for k in build_extractor(self.settings.keyinfo).extract(parsed, chunks)
                       if k.level == "article" or k.chunk_ord == ord_]
                audit = store.edit_chunk(doc_id, ord_, text, user, kis)
            faults.point("kb.before_sync")
            index = self.sync(False)
        return {**out, "changed": True, "edit_id": audit["edit_id"], "at": iso_time(audit["at"]), "index": index}

    def delete(self) -> None:
        """Delete the KB: its folder is renamed away in one step (a kill leaves the KB whole or
        gone, never half), then removed; writers waiting for its lock see it gone."""
        with self.writing():
            trash = self.dir.with_name(f".deleted-{self.name}-{secrets.token_hex(4)}")
            if self.settings.store.shared:  # the store goes in one transaction; the folder is this host's cache
                from ingest import pgstore

                pgstore.drop(self.settings.store, self.name)
                if self.dir.is_dir():
                    self.dir.rename(trash)
            else:
                self.dir.rename(trash)
            if self.uses_milvus:  # left behind (a kill, Milvus down), they name the old store: never read again
                try:
                    self.milvus().drop()
                except Exception as e:  # noqa: BLE001 (the KB is gone either way)
                    log.warning("knowledge base %s deleted; its Milvus collections were not dropped: %s", self.name, e)
            with self._lock:
                self._live = None
                self._gpu = None
        shutil.rmtree(trash, ignore_errors=True)
        for old in self.dir.parent.glob(".deleted-*"):  # left by a delete killed before its rmtree
            shutil.rmtree(old, ignore_errors=True)

    def sync(self, progress: bool = False, rebuild: bool = False) -> dict:
        """Bring the index in line with the store (see retrieval.index.sync_index)."""
        with self.writing(), self.store() as store:
            if self.settings.store.shared:  # no sync may overlap another writer's
                from ingest.pgstore import check_write_lock

                check_write_lock(self.settings.store, self.name)
            if self.uses_milvus:
                from retrieval.milvus import sync_milvus

                self.dir.mkdir(parents=True, exist_ok=True)  # this host's embedding cache

                info = sync_milvus(store, self.milvus(), self.settings.retrieval, self.embedder,
                                   self.dir / "embeddings.sqlite", progress, rebuild)
            else:
                info = sync_index(store, self.dir, self.settings.retrieval, self.embedder, progress, rebuild)
        with self._lock:
            self._live = None
        return info

    def reindex(self, progress: bool = False) -> dict:
        """Rebuild the index from scratch with the configured embedder beside the live one and
        swap it in; the live index answers until then and stays when the rebuild fails."""
        return self.sync(progress, rebuild=True)

    @property
    def uses_milvus(self) -> bool:
        """Whether level 1 lives in Milvus (`retrieval.backend: milvus`) rather than in the KB's folder."""
        return self.settings.retrieval.backend == "milvus"

    def milvus(self):
        """This KB's level 1 in Milvus (retrieval.milvus.MilvusLevel1), made once per KB object:
        searches do not reread the data folder's id or look up the client each time."""
        if self._level1 is None:
            from retrieval.milvus import MilvusLevel1

            owner = None
            if self.settings.store.shared:  # the same on every host that shares the store
                from ingest.pgstore import data_id

                owner = f"pg:{data_id(self.settings.store)}"
            self._level1 = MilvusLevel1(self.settings.milvus, self.settings.home, self.name, owner)
        return self._level1

    def vector_count(self) -> int:
        """Entries in level 1 now (0 before the first sync)."""
        live = self._index()
        return len(live.vectors) if live is not None else 0

    def index_generation(self) -> str | None:
        """The live generation of level 1 (a folder name, or a Milvus collection), None before the first sync."""
        return self.milvus().current() if self.uses_milvus else IndexDir(self.dir).current()

    # reads --------------------------------------------------------------------------------------
    def _index(self) -> LoadedIndex | None:
        if self.uses_milvus:
            level1 = self.milvus()
            gen = level1.current()
            with self._lock:
                if self._live is not None and self._live.gen == gen:
                    return self._live
                with self.store() as store:
                    store_id = store.store_id(create=False)
                if self._refused == (gen, store_id):  # refused once (and logged): not again per search
                    return None
                self._live = level1.load(self.settings.retrieval, self.embedder.model_id, store_id)
                self._refused = None if self._live is not None else (gen, store_id)
            return self._live
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
                hits = level2_hits(rows, fused, store, cfg, dict(vec), dict(kw))
                if cfg.rerank and self.settings.models.reranker:
                    rr = shared_reranker(self.settings.models.reranker, self.settings.models.device)
                    hits = rr.rerank(query, hits[: cfg.rerank_candidates])
                results.append(hits[:k])
        return results

    def stats(self) -> dict:
        with self.store() as store:
            c = store.counts()
        return {"name": self.name, **c, "index_generation": self.index_generation()}


