"""Vector search: build time, QPS at batch 1 and 64, recall@10 against exact search.

For each size (synthetic clustered vectors of the configured model's dimension) and index type
(flat = exact IndexFlatIP, IVF, HNSW) with faiss-cpu on this machine's cores, and, when a GPU is
present, the project's exact torch backend (fp16 matmul + top-k) in the same run. The baseline of
each row is exact flat search on the CPU.

    python -m bench.search --sizes 100000 --name search_cpu
    python -m bench.search --sizes 100000,1000000 --name search_gpu    # on the GPU machine
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.common import peak_rss_gib, table, write_result
from retrieval.vector import FaissIndex, TorchExactIndex


def clustered(n: int, dim: int, seed: int, intrinsic: int = 48) -> np.ndarray:
    """Unit vectors with low intrinsic dimension, like real sentence embeddings: a random linear
    map of `intrinsic`-dimensional Gaussian points plus a little noise (fixed map across seeds)."""
    w = np.random.default_rng(1234).standard_normal((intrinsic, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        z = rng.standard_normal((m, intrinsic)).astype(np.float32)
        out[s : s + m] = z @ w + 0.1 * np.sqrt(intrinsic) * rng.standard_normal((m, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def qps(index, q: np.ndarray, batch: int, k: int = 10, max_seconds: float = 10.0) -> tuple[float, np.ndarray]:
    ids = []
    t = time.perf_counter()
    done = 0
    for s in range(0, len(q), batch):
        ids.append(index.search(q[s : s + batch], k)[1])
        done += len(q[s : s + batch])
        if time.perf_counter() - t > max_seconds:
            break
    return done / (time.perf_counter() - t), np.concatenate(ids)


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    n = min(len(got), len(exact))
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got[:n], exact[:n])]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--types", default="flat,ivf,hnsw")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--name", default="search_cpu")
    a = ap.parse_args()
    import faiss

    threads = faiss.omp_get_max_threads()
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    runs = []
    for n in map(int, a.sizes.split(",")):
        x = clustered(n, a.dim, 0)
        q = clustered(a.queries, a.dim, 1)
        ids = np.arange(n, dtype=np.int64)
        t = time.perf_counter()
        flat = FaissIndex.build(x, ids, "flat")
        flat_build = time.perf_counter() - t
        base_b1, _ = qps(flat, q[:300], 1)
        base_b64, exact = qps(flat, q, 64)
        baseline = {"qps_batch1": round(base_b1, 1), "qps_batch64": round(base_b64, 1),
                    "build_s": round(flat_build, 2), "recall@10": 1.0, "peak_mem_gib": round(peak_rss_gib(), 2)}
        for kind in a.types.split(","):
            t = time.perf_counter()
            idx = flat if kind == "flat" else FaissIndex.build(x, ids, kind, nprobe=64, ef_search=128)
            build = flat_build if kind == "flat" else time.perf_counter() - t
            b1, got1 = qps(idx, q[:300], 1)
            b64, got = qps(idx, q, 64)
            setting = {"vectors": n, "dim": a.dim, "index": kind, "backend": f"faiss-cpu ({threads} threads)"}
            project = {"qps_batch1": round(b1, 1), "qps_batch64": round(b64, 1), "build_s": round(build, 2),
                       "recall@10": round(recall(got, exact), 4), "peak_mem_gib": round(peak_rss_gib(), 2)}
            runs.append({"setting": setting, "project": project, "baseline": baseline})
            print(f"{n} {kind}: b1 {b1:.0f} q/s, b64 {b64:.0f} q/s, recall {runs[-1]['project']['recall@10']}",
                  file=sys.stderr)
            if kind != "flat":
                del idx
        if gpu:
            import torch

            t = time.perf_counter()
            tix = TorchExactIndex(x, ids, "cuda")
            torch.cuda.synchronize()
            build = time.perf_counter() - t
            torch.cuda.reset_peak_memory_stats()
            qps(tix, q[:50], 1)  # warm-up
            b1, _ = qps(tix, q[:1000], 1)
            b64, got = qps(tix, q, 64)
            b1024, _ = qps(tix, q, 1024)
            runs.append({"setting": {"vectors": n, "dim": a.dim, "index": "exact torch fp16", "backend": "torch cuda"},
                         "project": {"qps_batch1": round(b1, 1), "qps_batch64": round(b64, 1),
                                     "qps_batch1024": round(b1024, 1),
                                     "build_s": round(build, 2), "recall@10": round(recall(got, exact), 4),
                                     "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)},
                         "baseline": baseline})
            del tix
        del flat, x
    path = write_result(a.name, {"runs": runs})
    rows = [{**r["setting"], **{f"{k}": v for k, v in r["project"].items()}} for r in runs]
    print(table(rows, ["vectors", "index", "backend", "build_s", "qps_batch1", "qps_batch64", "recall@10",
                       "peak_mem_gib"]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
