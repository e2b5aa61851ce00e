"""Vector indexes: FAISS (flat, IVF, HNSW; GPU when faiss has one) or exact torch search on a GPU.

All indexes hold L2-normalised vectors with int64 ids and score by inner product (cosine).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def hnsw_ef_construction(m: int) -> int:
    """The candidate list size while building an HNSW graph of `m` neighbours per node (FAISS and Milvus alike)."""
    return max(40, 2 * m)


def choose_type(n: int, index_type: str = "auto", flat_max: int = 50_000) -> str:
    """flat (exact) for small collections, HNSW above `flat_max`, unless the config names one."""
    if index_type != "auto":
        return index_type
    return "flat" if n <= flat_max else "hnsw"


class FaissIndex:
    """A FAISS index wrapped in IndexIDMap2, so ids are the key-info ids."""

    def __init__(self, index, kind: str, dim: int, nprobe: int = 16, ef_search: int = 128) -> None:
        self.index = index
        self.kind = kind
        self.dim = dim
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._gpu = None
        self._tune()

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, kind: str, *, hnsw_m: int = 32,
              ef_search: int = 128, nprobe: int = 16, use_gpu: bool = False) -> FaissIndex:
        import faiss

        n, dim = vectors.shape if len(vectors) else (0, vectors.shape[1])
        if kind == "flat":
            inner = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = hnsw_ef_construction(hnsw_m)
        elif kind == "ivf":
            nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), max(1, n // 39)))
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            if n:
                inner.train(np.ascontiguousarray(vectors, dtype=np.float32))
        else:
            raise ValueError(f"unknown index type {kind!r}")
        idx = cls(faiss.IndexIDMap2(inner), kind, dim, nprobe, ef_search)
        if n:
            idx.add(vectors, ids)
        if use_gpu:
            idx.to_gpu()
        return idx

    def _tune(self) -> None:
        import faiss

        inner = faiss.downcast_index(self.index.index)
        if self.kind == "hnsw":
            inner.hnsw.efSearch = self.ef_search
        elif self.kind == "ivf":
            inner.nprobe = self.nprobe

    @property
    def supports_remove(self) -> bool:
        return self.kind in {"flat", "ivf"}

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        import faiss

        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        self._gpu = None

    def remove(self, ids: np.ndarray) -> int:
        import faiss

        if not self.supports_remove:
            raise NotImplementedError(f"{self.kind} index cannot remove vectors; rebuild it")
        removed = self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))
        self._gpu = None
        return int(removed)

    def to_gpu(self) -> bool:
        """Move a flat/IVF index to the GPU when faiss has GPU support; False otherwise."""
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0 or self.kind == "hnsw":
            return False
        self._gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.index)
        return True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = min(k, len(self))
        index = self._gpu if self._gpu is not None else self.index
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, kind: str, dim: int, nprobe: int = 16, ef_search: int = 128) -> FaissIndex:
        import faiss

        return cls(faiss.read_index(str(path)), kind, dim, nprobe, ef_search)


class TorchExactIndex:
    """Exact inner-product search as a matrix product + top-k in torch (fp16 on GPU).

    Used on a GPU that faiss cannot use (no faiss-gpu build for its CUDA); runs on CPU too, which is
    how the tests exercise it.
    """

    kind = "flat"
    supports_remove = True

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, device: str = "cuda") -> None:
        import torch

        self.device = device
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.dim = vectors.shape[1]
        self._ids = np.asarray(ids, dtype=np.int64)
        self._mat = torch.as_tensor(np.ascontiguousarray(vectors), dtype=dtype, device=device)

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if len(self) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = min(k, len(self))
        q = torch.as_tensor(np.ascontiguousarray(queries), dtype=self._mat.dtype, device=self.device)
        scores, idx = torch.topk(q @ self._mat.T, k, dim=1)
        return scores.float().cpu().numpy(), self._ids[idx.cpu().numpy()]


def gpu_backend(backend: str) -> str | None:
    """Which GPU search to use: 'faiss' (faiss has a GPU), 'torch' (torch sees one), or None."""
    if backend == "faiss":
        return None
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if backend == "torch":
        return "torch"
    if not has_cuda:
        return None
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "faiss"
    return "torch"


def torch_from_faiss(index: FaissIndex, device: str) -> TorchExactIndex:
    """An exact torch index holding the same vectors and ids as a FAISS index."""
    import faiss

    inner = faiss.downcast_index(index.index.index)
    n = int(inner.ntotal)
    vecs = inner.reconstruct_n(0, n) if n else np.zeros((0, index.dim), np.float32)
    return TorchExactIndex(vecs, index.ids(), device)
