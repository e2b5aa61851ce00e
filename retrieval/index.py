"""The two-level index of one knowledge base, written as immutable generations.

Level 1 holds the embeddings of the key information (article, segment, sentence entries of the
store); level 2 is the raw text each entry maps to, one to one, in the store. A generation is a
folder with the FAISS index, the BM25 index and `meta.json`; `CURRENT` names the live one and is
replaced atomically (write, fsync, rename), so a crash in the middle of a write leaves the previous
generation live and loadable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.store import DocStore
from kb.settings import RetrievalConfig
from retrieval.embedder import Embedder, EmbeddingCache
from retrieval.keyword import KeywordIndex, tokenize
from retrieval.vector import FaissIndex, choose_type

log = logging.getLogger(__name__)
INDEX_FORMAT = 1


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


class IndexDir:
    """`<kb_dir>/index/`: generations and the CURRENT pointer."""

    def __init__(self, kb_dir: Path) -> None:
        self.root = Path(kb_dir) / "index"

    def current(self) -> str | None:
        ptr = self.root / "CURRENT"
        if not ptr.is_file():
            return None
        gen = ptr.read_text().strip()
        return gen if (self.root / gen / "meta.json").is_file() else None

    def load(self, cfg: RetrievalConfig, embedder_id: str | None = None) -> LoadedIndex | None:
        gen = self.current()
        if gen is None:
            return None
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
        """Write a new generation and make it current; old generations are removed after."""
        self.root.mkdir(parents=True, exist_ok=True)
        prev = self.current()
        n = int(prev.split("-")[1]) + 1 if prev else 1
        gen = f"gen-{n:06d}"
        tmp = self.root / f"{gen}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        vectors.save(tmp / "vectors.faiss")
        if keywords is not None:
            keywords.save(tmp)
        (tmp / "meta.json").write_text(json.dumps({**meta, "keyword": keywords is not None}, indent=2))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        tmp.rename(self.root / gen)
        ptr_tmp = self.root / "CURRENT.tmp"
        ptr_tmp.write_text(gen)
        with open(ptr_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(ptr_tmp, self.root / "CURRENT")
        _fsync_dir(self.root)
        for old in self.root.iterdir():  # keep the live and the previous generation
            if old.is_dir() and old.name not in {gen, prev}:
                shutil.rmtree(old, ignore_errors=True)
        return gen


def desired_entries(store: DocStore, cfg: RetrievalConfig) -> tuple[np.ndarray, list[str], list[str]]:
    """(ki ids, texts to embed, texts for BM25) of the entries level 1 should hold."""
    q = ("SELECT ki_id, level, key_text, raw_text FROM key_infos WHERE level IN "
         f"({','.join('?' * len(cfg.levels))}) ORDER BY ki_id")
    ids, emb_texts, kw_texts = [], [], []
    for ki_id, level, key_text, raw_text in store.conn.execute(q, cfg.levels):
        ids.append(ki_id)
        emb_texts.append(key_text if cfg.embed_field == "key_text" else raw_text)
        # keywords search the raw text of segments and the key text of the other levels
        kw_texts.append(f"{key_text}\n{raw_text}" if level == "segment" else key_text)
    return np.asarray(ids, dtype=np.int64), emb_texts, kw_texts


def sync_index(store: DocStore, kb_dir: Path, cfg: RetrievalConfig, embedder: Embedder,
               progress: bool = False) -> dict:
    """Bring level 1 in line with the store: embed only new entries, publish a new generation."""
    t0 = time.perf_counter()
    idir = IndexDir(kb_dir)
    layout = {"levels": list(cfg.levels), "embed_field": cfg.embed_field, "format": INDEX_FORMAT}
    ids, emb_texts, kw_texts = desired_entries(store, cfg)
    try:
        live = idir.load(cfg, embedder.model_id)
    except IndexMismatchError:
        raise
    if live is not None and any(live.meta.get(k) != v for k, v in layout.items()):
        live = None  # another layout (levels/field): rebuild
    cache = EmbeddingCache(Path(kb_dir) / "embeddings.sqlite", embedder.cache_id("passage"))
    try:
        kind = choose_type(len(ids), cfg.index_type, cfg.flat_max)
        present = live.vectors.ids() if live is not None else np.zeros(0, np.int64)
        want = set(ids.tolist())
        have = set(present.tolist())
        to_add = sorted(want - have)
        to_remove = sorted(have - want)
        keyword_ok = (live is not None and (live.keywords is not None) == cfg.hybrid)
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
        if cfg.hybrid:
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
    for i in range(0, len(uniq), 900):
        part = uniq[i : i + 900]
        for k, toks in conn.execute(f"SELECT key, toks FROM tokens WHERE key IN ({','.join('?' * len(part))})", part):
            have[k] = json.loads(toks)
    new = {k: tokenize(t) for k, t in zip(keys, texts) if k not in have}
    if new:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO tokens VALUES (?,?)",
                             [(k, json.dumps(v, ensure_ascii=False)) for k, v in new.items()])
        have.update(new)
    return [have[k] for k in keys]
