"""The two-level index of one knowledge base, written as immutable generations.

Level 1 holds the embeddings of the key information (article, segment, sentence entries of the
store); level 2 is the raw text each entry maps to, one to one, in the store. A generation is a
folder with the FAISS index, the BM25 index and `meta.json`; `CURRENT` names the live one.

Crash safety: a writer (holding the KB's write lock, kb/writelock.py) writes a generation under a
unique temporary name, renames it to a number above every folder present, then replaces `CURRENT`
atomically (write, fsync, rename). A kill at any step leaves `CURRENT` naming a whole generation;
the next writer removes what the killed one left (`IndexDir.recover`). Readers take no lock: they
load only what `CURRENT` names and, when a newer publish removed that generation under them,
read `CURRENT` again. The previous generation is kept for readers still loading it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ingest.store import DocStore
from kb import faults
from kb.fsutil import replacing_file
from kb.settings import RetrievalConfig
from kb.sqlutil import in_batches
from kb.writelock import write_lock
from retrieval.embedder import Embedder, EmbeddingCache
from retrieval.keyword import KeywordIndex, tokenize
from retrieval.vector import FaissIndex, choose_type

log = logging.getLogger(__name__)
INDEX_FORMAT = 1
POINTER = "CURRENT"
_GEN = re.compile(r"^gen-(\d+)$")
_NUMBERED = re.compile(r"gen-(\d+)")
_READ_TRIES = 5


class IndexMismatchError(RuntimeError):
    """The index on disk was built with another embedding model or layout."""


@dataclass
class LoadedIndex:
    gen: str
    meta: dict
    vectors: FaissIndex
    keywords: KeywordIndex | None


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _gen_number(name: str) -> int | None:
    m = _GEN.match(name)
    return int(m.group(1)) if m else None


class IndexDir:
    """`<kb_dir>/index/`: generations and the CURRENT pointer.

    Reads (`current`, `load`) need no lock; `publish` and `recover` need the KB's write lock."""

    def __init__(self, kb_dir: Path) -> None:
        self.root = Path(kb_dir) / "index"

    def pointer(self) -> str | None:
        """What CURRENT names (None when there is no CURRENT)."""
        try:
            gen = (self.root / POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        return gen or None

    def current(self) -> str | None:
        """The live generation: what CURRENT names, read again when that generation vanished
        under a newer publish; None when there is no index."""
        for _ in range(_READ_TRIES):
            gen = self.pointer()
            if gen is None or (self.root / gen / "meta.json").is_file():
                return gen
            if self.pointer() == gen:
                log.warning("index CURRENT names %s, which is not a whole generation", gen)
                return None
        return None

    def load(self, cfg: RetrievalConfig, embedder_id: str | None = None) -> LoadedIndex | None:
        """Load the live generation; when a newer publish removes it while it loads, load the
        generation CURRENT names now."""
        for attempt in range(_READ_TRIES):
            gen = self.current()
            if gen is None:
                return None
            try:
                return self._load_gen(gen, cfg, embedder_id)
            except IndexMismatchError:
                raise
            except (OSError, RuntimeError, ValueError):
                if self.pointer() == gen and (self.root / gen).is_dir():
                    raise  # the live generation itself is unreadable
                log.info("index generation %s was replaced while loading (try %d); loading the new one",
                         gen, attempt + 1)
        raise RuntimeError(f"the index under {self.root} kept changing while it was loaded")

    def _load_gen(self, gen: str, cfg: RetrievalConfig, embedder_id: str | None) -> LoadedIndex:
        folder = self.root / gen
        meta = json.loads((folder / "meta.json").read_text())
        if embedder_id is not None and meta["embedder"] != embedder_id:
            raise IndexMismatchError(
                f"the index of this knowledge base was built with embedding model {meta['embedder']!r} "
                f"but the config now says {embedder_id!r}; rebuild it with `kb reindex --kb NAME`")
        vec = FaissIndex.load(folder / "vectors.faiss", meta["kind"], meta["dim"], cfg.ivf_nprobe,
                              cfg.hnsw_ef_search)
        kw = KeywordIndex.load(folder) if meta.get("keyword") else None
        return LoadedIndex(gen, meta, vec, kw)

    def publish(self, vectors: FaissIndex, keywords: KeywordIndex | None, meta: dict) -> str:
        """Write a new generation and make it current; generations older than the previous one
        are removed after. The caller holds the KB's write lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        prev = self.current()
        gen = f"gen-{self._next_number():06d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{gen}-{os.getpid()}-", dir=self.root))
        try:
            tmp.chmod(0o755)
            vectors.save(tmp / "vectors.faiss")
            faults.point("publish.temp_partial")
            if keywords is not None:
                keywords.save(tmp)
            (tmp / "meta.json").write_text(json.dumps({**meta, "keyword": keywords is not None}, indent=2))
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync_file(f)
            _fsync_dir(tmp)
            faults.point("publish.before_rename")
            tmp.rename(self.root / gen)  # no folder of that name: the number is above every folder's
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        faults.point("publish.after_rename")
        self._point_to(gen)
        faults.point("publish.after_replace")
        for old in self._entries_except({gen, prev}):
            _remove(old)
            faults.point("publish.cleanup")
        return gen

    def recover(self) -> list[str]:
        """Remove what a killed writer left: temporary folders and pointer files, generations
        that CURRENT never named (or no longer names, past the previous one), half-removed ones.
        The caller holds the KB's write lock. Returns the names removed."""
        if not self.root.is_dir():
            return []
        live = self.current()
        keep = {live, self._previous(live)}
        removed = []
        for p in self._entries_except(keep):
            _remove(p)
            removed.append(p.name)
        if removed:
            log.info("index of %s: removed %s left by an interrupted write", self.root.parent.name,
                     ", ".join(sorted(removed)))
        return removed

    def revert_to(self, gen: str | None) -> None:
        """Make `gen` current again (None: no index) and remove the generations after it: undoes
        a publish that must not stand (a failed migration). The caller holds the KB's write lock."""
        if not self.root.is_dir():
            return
        if gen is None:
            (self.root / POINTER).unlink(missing_ok=True)
        else:
            self._point_to(gen)
        for p in self._entries_except({gen, self._previous(gen)}):
            _remove(p)

    def _point_to(self, gen: str) -> None:
        """Replace CURRENT atomically with one naming `gen`."""
        with replacing_file(self.root / POINTER, mode=0o644) as tmp:
            tmp.write_text(gen)
            faults.point("publish.pointer_written")
        _fsync_dir(self.root)

    def _next_number(self) -> int:
        """One above every generation number present, in any folder or file name and in CURRENT."""
        names = [p.name for p in self.root.iterdir()] + [self.pointer() or ""]
        return max((int(n) for name in names for n in _NUMBERED.findall(name)), default=0) + 1

    def _previous(self, live: str | None) -> str | None:
        """The newest whole generation below `live` (kept for readers still loading it)."""
        if live is None or _gen_number(live) is None:
            return None
        below = [p.name for p in self.root.iterdir()
                 if (n := _gen_number(p.name)) is not None and n < _gen_number(live) and (p / "meta.json").is_file()]
        return max(below, key=_gen_number, default=None)

    def _entries_except(self, keep: set[str | None]) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.name != POINTER and p.name not in keep)


def _remove(path: Path) -> None:
    """Remove a folder or file; a folder is renamed out of the generation names first, so a kill
    in the middle never leaves a half-removed folder that looks like a generation."""
    if path.is_dir():
        trash = path.with_name(f".trash-{path.name}-{secrets.token_hex(4)}")
        try:
            path.rename(trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Entries(NamedTuple):
    """The entries level 1 should hold, in ki_id order."""

    ids: np.ndarray
    emb_texts: list[str]
    """The text each entry is embedded from."""
    kw_texts: list[str]
    """The text each entry's BM25 tokens come from."""
    doc_ids: list[str]
    levels: list[str]


def desired_entries(store: DocStore, cfg: RetrievalConfig) -> Entries:
    """The entries level 1 should hold (one read of the store)."""
    q = ("SELECT ki_id, level, key_text, raw_text, doc_id FROM key_infos WHERE level IN "
         f"({','.join('?' * len(cfg.levels))}) ORDER BY ki_id")
    ids, emb_texts, kw_texts, doc_ids, levels = [], [], [], [], []
    for ki_id, level, key_text, raw_text, doc_id in store.conn.execute(q, cfg.levels):
        ids.append(ki_id)
        doc_ids.append(doc_id)
        levels.append(level)
        emb_texts.append(key_text if cfg.embed_field == "key_text" else raw_text)
        # keywords search the raw text of segments and the key text of the other levels; a
        # single-level index of raw text (embed_field raw_text) has no key information at all
        if cfg.embed_field == "raw_text":
            kw_texts.append(raw_text)
        else:
            kw_texts.append(f"{key_text}\n{raw_text}" if level == "segment" else key_text)
    return Entries(np.asarray(ids, dtype=np.int64), emb_texts, kw_texts, doc_ids, levels)


def sync_index(store: DocStore, kb_dir: Path, cfg: RetrievalConfig, embedder: Embedder,
               progress: bool = False, rebuild: bool = False) -> dict:
    """Bring level 1 in line with the store: embed only new entries, publish a new generation.

    Holds the KB's write lock (reentrant: callers that already hold it may call this) and first
    removes what an interrupted write left. `rebuild`: build from scratch with `embedder`, ignoring
    the live index (even one built with another embedder), and swap it in; the live index keeps
    answering until then, and stays when the rebuild fails."""
    with write_lock(kb_dir, cfg.write_lock_timeout_s):
        IndexDir(kb_dir).recover()
        return _sync_locked(store, Path(kb_dir), cfg, embedder, progress, rebuild)


def _sync_locked(store: DocStore, kb_dir: Path, cfg: RetrievalConfig, embedder: Embedder, progress: bool,
                 rebuild: bool) -> dict:
    t0 = time.perf_counter()
    idir = IndexDir(kb_dir)
    layout = {"levels": list(cfg.levels), "embed_field": cfg.embed_field, "format": INDEX_FORMAT}
    ids, emb_texts, kw_texts, _, _ = desired_entries(store, cfg)
    live = None if rebuild else idir.load(cfg, embedder.model_id)
    if live is not None and any(live.meta.get(k) != v for k, v in layout.items()):
        live = None  # another layout (levels/field): rebuild
    cache = EmbeddingCache(kb_dir / "embeddings.sqlite", embedder.cache_id("passage"))
    try:
        kind = choose_type(len(ids), cfg.index_type, cfg.flat_max)
        present = live.vectors.ids() if live is not None else np.zeros(0, np.int64)
        want = set(ids.tolist())
        have = set(present.tolist())
        to_add = sorted(want - have)
        to_remove = sorted(have - want)
        keyword_ok = (live is not None and (live.keywords is not None) == cfg.uses_keywords)
        if live is not None and not to_add and not to_remove and keyword_ok and live.meta["kind"] == kind:
            return {"generation": live.gen, "added": 0, "removed": 0, "vectors": len(have), "unchanged": True}
        pos = {int(i): j for j, i in enumerate(ids)}
        if live is not None and live.meta["kind"] == kind and live.vectors.supports_remove:
            vec = live.vectors
            if to_remove:
                vec.remove(np.asarray(to_remove, dtype=np.int64))
            if to_add:
                vec.add(cache.embed(embedder, [emb_texts[pos[i]] for i in to_add], "passage", progress),
                        np.asarray(to_add))
        else:
            all_vecs = cache.embed(embedder, emb_texts, "passage", progress)
            vec = FaissIndex.build(all_vecs if len(ids) else np.zeros((0, embedder.dim), np.float32), ids, kind,
                                   hnsw_m=cfg.hnsw_m, ef_search=cfg.hnsw_ef_search, nprobe=cfg.ivf_nprobe)
        kw = None
        if cfg.uses_keywords:
            kw = KeywordIndex.build(cached_tokens(cache, kw_texts), ids)
        meta = {**layout, "embedder": embedder.model_id, "dim": embedder.dim, "kind": kind,
                "vectors": len(vec), "created": time.time()}
        gen = idir.publish(vec, kw, meta)
    finally:
        cache.close()
    return {"generation": gen, "added": len(to_add), "removed": len(to_remove), "vectors": len(vec),
            "kind": kind, "seconds": round(time.perf_counter() - t0, 3), "unchanged": False}


def cached_tokens(cache: EmbeddingCache, texts: list[str]) -> list[list[str]]:
    """BM25 tokens of `texts`, cached beside the embeddings (jieba is the slow part)."""
    from retrieval.embedder import text_key

    conn = cache.conn
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS tokens (key TEXT PRIMARY KEY, toks TEXT)")
    keys = [text_key(t) for t in texts]
    have: dict[str, list[str]] = {}
    uniq = list(dict.fromkeys(keys))
    for k, toks in in_batches(conn, "SELECT key, toks FROM tokens WHERE key IN ({})", uniq):
        have[k] = json.loads(toks)
    new = {k: tokenize(t) for k, t in zip(keys, texts) if k not in have}
    if new:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO tokens VALUES (?,?)",
                             [(k, json.dumps(v, ensure_ascii=False)) for k, v in new.items()])
        have.update(new)
    return [have[k] for k in keys]
