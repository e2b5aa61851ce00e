"""Level 1 of a knowledge base in Milvus (`retrieval.backend: milvus`).

One collection per KB generation (`<prefix><kb>_g<N>`), reached through the alias `<prefix><kb>`:
a rebuild (another embedder, levels or field) fills a new collection beside the live one and
moves the alias in one step, as the FAISS backend moves its CURRENT pointer. A row is one
key-information entry: the store's ki_id, its document id and level, its vector and its BM25
terms. Milvus computes BM25 from the terms with its own function and searches both sides in the
engine; the fusion is the same as the embedded backend's (`retrieval.search.fuse`).

The terms are this project's tokens (`retrieval.keyword.tokenize`: jieba for Chinese, words for
English) written as hashed ASCII words, so Milvus's standard analyzer counts the tokens the
embedded BM25 counts (the first MAX_TERMS of an entry), on Milvus Lite and on a cluster alike;
the scores agree where Milvus computes term statistics over the whole collection (Milvus Lite
computes them per segment of up to 100,000 rows). The store stays the source of truth: a sync
diffs the collection against it (an interrupted sync is repaired by the next), and a hit whose
entry has left the store is dropped when its row is looked up. Each generation records the store
it was built from (`DocStore.store_id`) and the KB folder it belongs to: a new store of the same
KB name rebuilds, another data folder's KB of that name is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ingest.store import DocStore
from kb.errors import Unavailable
from kb.paths import home_id
from kb.settings import MilvusConfig, RetrievalConfig
from retrieval.embedder import Embedder, EmbeddingCache
from retrieval.index import INDEX_FORMAT, IndexMismatchError, LoadedIndex, cached_tokens, desired_entries
from retrieval.vector import choose_type, hnsw_ef_construction

log = logging.getLogger(__name__)
BM25_K1, BM25_B = 1.5, 0.75
"""bm25s's defaults (the embedded backend's BM25), so both backends rank alike."""
MAX_TEXT = 65_535
MAX_TERMS = MAX_TEXT // 18
"""Terms kept per entry: each is 17 characters and a space."""
_CLIENTS: dict[tuple[str, str, str], object] = {}
_CLIENTS_LOCK = threading.Lock()
_GEN = re.compile(r"_g(\d+)$")


def bm25_terms(tokens: Sequence[str]) -> str:
    """`tokens` as space-separated ASCII words (t + 16 hex digits of a hash each): Milvus's standard
    analyzer keeps each one whole, whatever the language of the token."""
    return " ".join("t" + hashlib.blake2b(t.encode("utf-8"), digest_size=8).hexdigest() for t in tokens)


def collection_base(prefix: str, kb: str) -> str:
    """The alias of KB `kb`: Milvus names allow letters, digits and `_`; a KB name's `.` and `-`
    are spelled `_p` and `_d`, and `_` doubled, so two KB names never share one."""
    return prefix + kb.replace("_", "__").replace(".", "_p").replace("-", "_d")


def resolved_uri(cfg: MilvusConfig, home: Path) -> str:
    """`milvus.uri`, or the file milvus.db in the data folder."""
    return cfg.uri or str(Path(home) / "milvus.db")


class MilvusUnavailable(Unavailable, RuntimeError):
    """Milvus cannot be reached or opened (a Lite file held by another process, a server down):
    the API answers 503, try again."""

    code = "index_unavailable"
    public = "the search index (Milvus) is unavailable; try again shortly"


class NotThisKB(RuntimeError):
    """The collection behind a KB's alias belongs to another data folder's KB of the same name."""


def client_for(cfg: MilvusConfig, home: Path):
    """One MilvusClient per (uri, credentials variable, database) in this process (thread-safe, reused)."""
    import os

    from pymilvus import MilvusClient

    uri = resolved_uri(cfg, home)
    key = (uri, cfg.token_env, cfg.db_name)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            if "://" not in uri:
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            kwargs: dict = {}
            if cfg.token_env:
                if not os.environ.get(cfg.token_env):
                    raise MilvusUnavailable(f"milvus.token_env names {cfg.token_env}, which is not set")
                kwargs["token"] = os.environ[cfg.token_env]
            if cfg.db_name:
                kwargs["db_name"] = cfg.db_name
            try:
                _CLIENTS[key] = MilvusClient(uri=uri, timeout=cfg.timeout_s, **kwargs)
            except Exception as e:  # noqa: BLE001 (pymilvus raises its own exception types)
                hint = (" (a Milvus Lite file serves one process: for several, run `milvus-lite server "
                        "--data-dir DIR` and set milvus.uri to http://127.0.0.1:19530)") if "://" not in uri else ""
                raise MilvusUnavailable(f"cannot open Milvus at {uri}: {e}{hint}") from e
        return _CLIENTS[key]


class MilvusVectors:
    """The dense side of a generation, searched like a FaissIndex: (scores, ids) per query."""

    supports_remove = True

    def __init__(self, client, collection: str, meta: dict, cfg: RetrievalConfig, timeout: float) -> None:
        self.client, self.collection, self.meta, self.cfg, self.timeout = client, collection, meta, cfg, timeout
        self.dim = int(meta["dim"])

    def __len__(self) -> int:
        return row_count(self.client, self.collection, self.timeout)

    def ids(self) -> np.ndarray:
        """Every ki_id in the collection."""
        return present_ids(self.client, self.collection, self.timeout)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` by inner product; rows padded with id -1 where fewer exist."""
        scores = np.zeros((len(queries), k), np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        knobs = {"nprobe": self.cfg.ivf_nprobe} if self.meta["kind"] == "ivf" else \
            {"ef": max(self.cfg.hnsw_ef_search, k)}
        res = self.client.search(self.collection, data=np.asarray(queries, np.float32).tolist(), anns_field="dense",
                                 limit=k, search_params={"metric_type": "IP", "params": knobs},
                                 output_fields=["ki_id"], timeout=self.timeout)
        for qi, hits in enumerate(res):
            for j, h in enumerate(hits[:k]):
                ids[qi, j], scores[qi, j] = int(h["ki_id"]), float(h["distance"])
        return scores, ids


class MilvusKeywords:
    """The BM25 side of a generation, searched like a KeywordIndex: [(ki_id, score)]."""

    def __init__(self, client, collection: str, timeout: float) -> None:
        self.client, self.collection, self.timeout = client, collection, timeout

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        from retrieval.keyword import tokenize

        terms = bm25_terms(tokenize(query))
        if not terms:
            return []
        res = self.client.search(self.collection, data=[terms], anns_field="sparse", limit=k,
                                 search_params={"metric_type": "BM25"}, output_fields=["ki_id"], timeout=self.timeout)
        # BM25 scores are >= 0; Milvus Lite reports them negated, a server as they are
        return [(int(h["ki_id"]), abs(float(h["distance"]))) for h in (res[0] if res else [])]


def row_count(client, collection: str, timeout: float) -> int:
    """Rows in `collection` now (count(*): deleted rows excluded, unlike the collection statistics)."""
    res = client.query(collection, filter="", output_fields=["count(*)"], timeout=timeout)
    return int(res[0]["count(*)"])


class _IteratorNoise(logging.Filter):
    """Milvus Lite answers a query iterator's timestamp request "not implemented" (the client then
    uses its own), logging an error and a warning each time: those two records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "mvccTs" in msg:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, NotImplementedError) and "AllocTimestamp" in "".join(
            traceback.format_tb(record.exc_info[2])))


for _name in ("grpc._server", "pymilvus.decorators", "pymilvus.client.iterator.query_iterator"):
    logging.getLogger(_name).addFilter(_IteratorNoise())


def present_ids(client, collection: str, timeout: float, batch: int = 5000) -> np.ndarray:
    """All ki_ids of `collection`, read with a query iterator (no 16,384-row query limit)."""
    out: list[int] = []
    it = client.query_iterator(collection, batch_size=batch, filter="ki_id >= 0", output_fields=["ki_id"],
                               timeout=timeout)
    try:
        while rows := it.next():
            out.extend(int(r["ki_id"]) for r in rows)
    finally:
        it.close()
    return np.asarray(sorted(out), dtype=np.int64)


class MilvusLevel1:
    """The generations of one KB's level 1 in Milvus and the alias that names the live one."""

    def __init__(self, cfg: MilvusConfig, home: Path, kb: str, data_id: str | None = None) -> None:
        """`data_id`: whose KB this is (a shared store's id); None: the data folder's id in `home`."""
        self.cfg, self.t = cfg, cfg.timeout_s
        self.client = client_for(cfg, home)
        self.alias = collection_base(cfg.collection_prefix, kb)
        self.owner = f"{data_id or home_id(home)}/{kb}"
        """This KB of this data folder (its random id, not its path: the same folder mounted
        elsewhere is the same owner, two folders at one path on two hosts are not)."""
        self.legacy_owner = self.owner if data_id else str((Path(home) / kb).resolve())
        """The owner generations built before data folders had ids recorded (their path)."""

    def mine(self, collection: str, meta: dict | None = None) -> bool:
        """Whether `collection` (its `meta`, when already read) was built for this KB of this data
        folder (or before owners were recorded)."""
        meta = self.meta(collection) if meta is None else meta
        return meta.get("owner") in (self.owner, self.legacy_owner, None)

    def current(self) -> str | None:
        """The collection the alias names, or None before the first sync."""
        if self.alias not in self.client.list_aliases(timeout=self.t).get("aliases", []):
            return None
        return self.client.describe_alias(self.alias, timeout=self.t)["collection_name"]

    def generations(self) -> list[str]:
        """This KB's collections, oldest first."""
        mine = [c for c in self.client.list_collections(timeout=self.t)
                if (m := _GEN.search(c)) and c[: m.start()] == self.alias]
        return sorted(mine, key=lambda c: int(_GEN.search(c).group(1)))

    def meta(self, collection: str) -> dict:
        """The generation's metadata (embedder, dim, layout, store, owner), a collection property."""
        return json.loads(self.client.describe_collection(collection, timeout=self.t)["properties"]["kb.meta"])

    def load(self, cfg: RetrievalConfig, embedder_id: str | None = None, store_id: str | None = None
             ) -> LoadedIndex | None:
        """The live generation as an index the search reads; None before the first sync and when
        the generation was built from another store than `store_id` or for another data folder
        (a recreated KB before its sync, a KB of the same name elsewhere): never foreign rows.
        IndexMismatchError when it was built with another embedding model."""
        gen = self.current()
        if gen is None:
            return None
        meta = self.meta(gen)
        if meta.get("store_id") is None or meta.get("store_id") != store_id:
            log.warning("Milvus collection %s was not built from this KB's store (%s): not searched until "
                        "the next write or `kb reindex`", gen, self.owner)
            return None
        if embedder_id is not None and meta["embedder"] != embedder_id:
            raise IndexMismatchError(
                f"the index of this knowledge base was built with embedding model {meta['embedder']!r} "
                f"but the config now says {embedder_id!r}; rebuild it with `kb reindex --kb NAME`")
        kw = MilvusKeywords(self.client, gen, self.t) if meta.get("keyword") else None
        return LoadedIndex(gen, meta, MilvusVectors(self.client, gen, meta, cfg, self.t), kw)

    def create(self, meta: dict, cfg: RetrievalConfig) -> str:
        """A new, empty generation with the dense index `meta['kind']` asks for and BM25 terms."""
        from pymilvus import DataType, Function, FunctionType

        gens = self.generations()
        n = int(_GEN.search(gens[-1]).group(1)) + 1 if gens else 1
        name = f"{self.alias}_g{n}"
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("ki_id", DataType.INT64, is_primary=True)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=256)
        schema.add_field("level", DataType.VARCHAR, max_length=16)
        schema.add_field("terms", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True,
                         analyzer_params={"tokenizer": "standard"})
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=int(meta["dim"]))
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["terms"],
                                     output_field_names=["sparse"]))
        index = self.client.prepare_index_params()
        index.add_index(field_name="dense", metric_type="IP", **dense_index(meta["kind"], int(meta.get("n", 0)), cfg))
        index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                        params={"bm25_k1": BM25_K1, "bm25_b": BM25_B})
        self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong",
                                      properties={"kb.meta": json.dumps(meta)}, timeout=self.t)
        return name

    def set_meta(self, collection: str, meta: dict) -> None:
        """Record `meta` on the generation."""
        self.client.alter_collection_properties(collection, {"kb.meta": json.dumps(meta)}, timeout=self.t)

    def publish(self, collection: str) -> None:
        """Point the alias at `collection` (one step); the generation it named before stays for
        readers still searching it until the next publish, older ones are dropped."""
        prev = self.current()
        if prev is None:
            self.client.create_alias(collection, self.alias, timeout=self.t)
        else:
            self.client.alter_alias(collection, self.alias, timeout=self.t)
        for old in self.generations():
            if old not in (collection, prev) and self.mine(old):
                self.client.drop_collection(old, timeout=self.t)

    def sweep(self) -> list[str]:
        """Drop this KB's generations newer than the live one (left by a rebuild killed before its
        publish); another owner's are left alone."""
        live = self.current()
        n = int(_GEN.search(live).group(1)) if live else 0
        gone = [c for c in self.generations() if int(_GEN.search(c).group(1)) > n and self.mine(c)]
        for c in gone:
            self.client.drop_collection(c, timeout=self.t)
        return gone

    def revert_to(self, previous: str | None) -> None:
        """Point the alias back at `previous` (None: remove it) and drop this KB's generations
        after it: undoes a publish that must not stand (a failed migration)."""
        live = self.current()
        if previous is None and live is not None and self.mine(live):
            self.client.drop_alias(self.alias, timeout=self.t)
        elif previous is not None and live != previous:
            self.client.alter_alias(previous, self.alias, timeout=self.t)
        n = int(_GEN.search(previous).group(1)) if previous else 0
        for c in self.generations():
            if int(_GEN.search(c).group(1)) > n and self.mine(c):
                self.client.drop_collection(c, timeout=self.t)

    def drop(self) -> None:
        """Remove the alias and every generation of this KB (another data folder's are left)."""
        live = self.current()
        if live is not None and self.mine(live):
            self.client.drop_alias(self.alias, timeout=self.t)
        for old in self.generations():
            if self.mine(old):
                self.client.drop_collection(old, timeout=self.t)

    def insert(self, collection: str, rows: Iterator[dict]) -> None:
        """Insert rows, `milvus.insert_batch` per request (built as they are sent)."""
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) == self.cfg.insert_batch:
                self.client.insert(collection, batch, timeout=self.t)
                batch = []
        if batch:
            self.client.insert(collection, batch, timeout=self.t)

    def delete(self, collection: str, ids: Sequence[int]) -> None:
        """Delete rows by ki_id, `milvus.insert_batch` per request."""
        ids = [int(i) for i in ids]
        for s in range(0, len(ids), self.cfg.insert_batch):
            self.client.delete(collection, ids=ids[s : s + self.cfg.insert_batch], timeout=self.t)


def dense_index(kind: str, n: int, cfg: RetrievalConfig) -> dict:
    """Milvus index arguments for the FAISS kind `retrieval.vector.choose_type` picked, with the
    same parameters as the embedded backend."""
    if kind == "hnsw":
        return {"index_type": "HNSW", "params": {"M": cfg.hnsw_m, "efConstruction": hnsw_ef_construction(cfg.hnsw_m)}}
    if kind == "ivf":
        return {"index_type": "IVF_FLAT", "params": {"nlist": max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39 or 1))}}
    return {"index_type": "FLAT"}


def _needs_rebuild(level1: MilvusLevel1, live: str, layout: dict, kind: str) -> bool:
    """Whether the live generation was built otherwise (layout, embedder, kind) or from another
    store of this KB (deleted and made again); NotThisKB when it is another data folder's."""
    meta = level1.meta(live)
    if meta.get("store_id") != layout["store_id"] and not level1.mine(live, meta):
        raise NotThisKB(f"Milvus collection {live} holds the KB of {meta['owner']}, not {level1.owner}: give "
                        "this data folder its own milvus.collection_prefix")
    return any(meta.get(k) != v for k, v in layout.items()) or meta.get("kind") != kind


def sync_milvus(store: DocStore, level1: MilvusLevel1, cfg: RetrievalConfig, embedder: Embedder,
                cache_path: Path, progress: bool = False, rebuild: bool = False) -> dict:
    """Bring the KB's Milvus level 1 in line with the store: rows of new entries inserted (only
    they are embedded), rows of gone entries deleted; a new generation, swapped in when full, when
    `rebuild` or the embedder, dimension, layout, BM25 side or store changed. The caller holds the
    KB's write lock."""
    t0 = time.perf_counter()
    level1.sweep()
    layout = {"levels": list(cfg.levels), "embed_field": cfg.embed_field, "format": INDEX_FORMAT,
              "embedder": embedder.model_id, "dim": embedder.dim, "keyword": cfg.uses_keywords,
              "store_id": store.store_id(), "owner": level1.owner}
    ids, emb_texts, kw_texts, doc_ids, levels = desired_entries(store, cfg)
    kind = choose_type(len(ids), cfg.index_type, cfg.flat_max)
    live = level1.current()
    stale = live is not None and _needs_rebuild(level1, live, layout, kind)  # first: NotThisKB even on rebuild
    fresh = rebuild or live is None or stale
    target = level1.create({**layout, "kind": kind, "n": len(ids)}, cfg) if fresh else live
    present = set() if fresh else set(present_ids(level1.client, target, level1.t).tolist())
    want = set(ids.tolist())
    to_add, to_remove = sorted(want - present), sorted(present - want)
    if not fresh and not to_add and not to_remove:
        return {"generation": live, "added": 0, "removed": 0, "vectors": len(want), "unchanged": True}
    if to_add:  # before the deletes: an edited entry is never missing from the collection
        pos = {int(i): j for j, i in enumerate(ids)}
        cache = EmbeddingCache(cache_path, embedder.cache_id("passage"))
        try:
            vecs = cache.embed(embedder, [emb_texts[pos[i]] for i in to_add], "passage", progress)
            toks = cached_tokens(cache, [kw_texts[pos[i]] for i in to_add]) if cfg.uses_keywords else None
        finally:
            cache.close()
        level1.insert(target, ({"ki_id": i, "doc_id": doc_ids[pos[i]], "level": levels[pos[i]],
                                "dense": vecs[j].tolist(),
                                "terms": bm25_terms(toks[j][:MAX_TERMS]) if toks is not None else ""}
                               for j, i in enumerate(to_add)))
    if to_remove:
        level1.delete(target, to_remove)
    if fresh:
        level1.publish(target)
    return {"generation": target, "added": len(to_add), "removed": len(to_remove), "vectors": len(want),
            "kind": kind, "seconds": round(time.perf_counter() - t0, 3), "unchanged": False}
