"""Level-1 vector search on the embedded FAISS index against Milvus (`retrieval.backend: milvus`),
the same vectors and queries, in one run: build seconds, queries/s one at a time and in batches,
recall@k against exact search.

Vectors: unit-length, 384 wide (e5-small's width), drawn around 2,000 cluster centres (embeddings
cluster by topic; uniform random vectors would be an unrealistically hard case for HNSW), queries
are perturbed copies of stored vectors. Both sides use the project's own classes with the same
HNSW settings (M 32, efConstruction `retrieval.vector.hnsw_ef_construction`, ef 128): FAISS
(`retrieval.vector.FaissIndex`, one graph) and Milvus (`retrieval.milvus.MilvusLevel1`); exact
search (FAISS IndexFlatIP) is the reference. FAISS's build is the index build alone; Milvus's is
split into the inserts (over gRPC, vectors as lists) with the flush, and the first search (which
waits for the segments' indexes). Milvus here is Milvus Lite, by default as a local file: it
keeps segments of up to 100,000 rows, each with its own HNSW graph (FAISS inside), searched one
after another and merged; a Milvus server's figures would differ.

    python -m bench.vector_backends --sizes 100000,1000000 --name vector_backends_cpu
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import table, write_result


def clustered(n: int, dim: int, seed: int, centres: int = 2000, spread: float = 0.35) -> np.ndarray:
    """`n` unit vectors around `centres` random unit centres."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        v = c[rng.integers(0, centres, m)] + spread * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[s : s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top k that a side found."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed_search(index, queries: np.ndarray, k: int, singles: int, batch: int) -> dict:
    """Queries/s one at a time (the first `singles` queries) and in batches of `batch`; the ids found."""
    t = time.perf_counter()
    for q in queries[:singles]:
        index.search(q[None, :], k)
    single = singles / (time.perf_counter() - t)
    t = time.perf_counter()
    ids = np.concatenate([index.search(queries[s : s + batch], k)[1] for s in range(0, len(queries), batch)])
    return {"qps_single": round(single, 1), "qps_batched": round(len(queries) / (time.perf_counter() - t), 1),
            "ids": ids}


def milvus_side(vectors: np.ndarray, cfg, uri: str, insert_batch: int):
    """A Milvus generation holding `vectors` (ids 0..n-1, no BM25 terms) under the prefix `bench_`;
    (vectors index, insert seconds, first-search seconds)."""
    from kb.settings import MilvusConfig
    from retrieval.milvus import MilvusLevel1, MilvusVectors

    level1 = MilvusLevel1(MilvusConfig(uri=uri, insert_batch=insert_batch, collection_prefix="bench_"),
                          Path(uri).parent, "vectors")
    level1.drop()
    meta = {"dim": vectors.shape[1], "kind": "hnsw", "embedder": "bench", "keyword": False}
    t = time.perf_counter()
    coll = level1.create(meta, cfg)
    level1.insert(coll, ({"ki_id": i, "doc_id": "d", "level": "segment", "dense": v.tolist(), "terms": ""}
                         for i, v in enumerate(vectors)))
    level1.client.flush(coll)
    inserted = time.perf_counter() - t
    level1.publish(coll)
    index = MilvusVectors(level1.client, coll, meta, cfg, level1.t)
    t = time.perf_counter()
    index.search(vectors[:1], 10)
    return index, inserted, time.perf_counter() - t


def versions() -> dict:
    """The versions of the libraries compared."""
    from importlib.metadata import version

    return {name: version(name) for name in ("faiss-cpu", "pymilvus", "milvus-lite")}


def run_size(n: int, args, cfg, tmp: Path) -> dict:
    """Both sides at `n` vectors."""
    from retrieval.vector import FaissIndex

    vectors = clustered(n, args.dim, seed=0)
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, n, args.queries)] + 0.05 * rng.standard_normal(
        (args.queries, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    exact = FaissIndex.build(vectors, ids, "flat")
    truth = exact.search(queries, args.k)[1]
    row: dict = {"setting": {"vectors": n, "dim": args.dim, "queries": args.queries, "k": args.k,
                             "hnsw_m": cfg.hnsw_m, "ef_search": cfg.hnsw_ef_search}}
    t = time.perf_counter()
    faiss_hnsw = FaissIndex.build(vectors, ids, "hnsw", hnsw_m=cfg.hnsw_m, ef_search=cfg.hnsw_ef_search)
    built = time.perf_counter() - t
    res = timed_search(faiss_hnsw, queries, args.k, args.singles, args.batch)
    row["faiss_hnsw"] = {"build_s": round(built, 1), **{k: v for k, v in res.items() if k != "ids"},
                         "recall_at_k": round(recall(res["ids"], truth), 4)}
    del faiss_hnsw
    uri = args.uri or str(tmp / f"milvus-{n}.db")
    index, inserted, first = milvus_side(vectors, cfg, uri, args.insert_batch)
    res = timed_search(index, queries, args.k, args.singles, args.batch)
    row["milvus_hnsw"] = {"insert_s": round(inserted, 1), "first_search_s": round(first, 1),
                          **{k: v for k, v in res.items() if k != "ids"},
                          "recall_at_k": round(recall(res["ids"], truth), 4), "uri": "server" if args.uri else "file"}
    print(n, {k: v for k, v in row.items() if k != "setting"}, flush=True)
    return row


def main() -> None:
    """Parse the arguments, run every size, write the result file."""
    from kb.settings import RetrievalConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--insert-batch", type=int, default=5000)
    ap.add_argument("--uri", default="", help="a Milvus server (default: a Milvus Lite file in a temporary folder)")
    ap.add_argument("--name", default="vector_backends_cpu")
    args = ap.parse_args()
    cfg = RetrievalConfig()
    tmp = Path(tempfile.mkdtemp(prefix="vecbench-"))
    try:
        runs = [run_size(int(n), args, cfg, tmp) for n in args.sizes.split(",")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = write_result(args.name, {"versions": versions(), "runs": runs})
    rows = [{**r["setting"], **{f"{side}.{k}": v for side in ("faiss_hnsw", "milvus_hnsw") for k, v in r[side].items()}}
            for r in runs]
    print(table(rows, list(rows[0])))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
