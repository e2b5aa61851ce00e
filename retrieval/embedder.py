"""Sentence embeddings (sentence-transformers, resolved offline) with a cache per knowledge base."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kb.models import pick_device, resolve_model


class Embedder:
    """Batched, L2-normalised embeddings, on GPU when there is one."""

    def __init__(self, spec: str, device: str = "auto", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self.spec = spec
        self.path = resolve_model(spec, "embedder")
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(self.path), device=self.device)
        if self.device.startswith("cuda"):
            self.model.half()
        self.dim = int(self.model.get_embedding_dimension())

    @property
    def model_id(self) -> str:
        """Identifies the weights: the spec and the folder's config, for index version checks."""
        cfg = self.path / "config.json"
        digest = hashlib.sha1(cfg.read_bytes()).hexdigest()[:10] if cfg.is_file() else "-"
        st = self.path / "model.safetensors"
        size = st.stat().st_size if st.is_file() else 0
        return f"{self.spec}#{digest}:{size}"

    def coverage(self, texts: Sequence[str]) -> np.ndarray:
        """Share of each text's tokens the model's vocabulary knows (not [UNK]): how far its
        embedding can be trusted. An English vocabulary covers about a third of Chinese text."""
        tok = self.model.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if unk is None:
            return np.ones(len(texts), dtype=np.float32)
        out = []
        for ids in tok(list(texts), add_special_tokens=False)["input_ids"]:
            out.append(1.0 - (sum(i == unk for i in ids) / len(ids)) if ids else 1.0)
        return np.asarray(out, dtype=np.float32)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress)
        return np.asarray(vecs, dtype=np.float32)


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """text → vector for one embedding model, in SQLite, so unchanged text is never re-embedded."""

    def __init__(self, path: str | Path, model_id: str) -> None:
        self.conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        self.model_id = model_id
        with self.conn:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS vectors (model TEXT, key TEXT, vec BLOB,"
                              " PRIMARY KEY (model, key))")
        self.hits = 0
        self.misses = 0

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        uniq = list(dict.fromkeys(keys))
        for i in range(0, len(uniq), 900):
            part = uniq[i : i + 900]
            rows = self.conn.execute(
                f"SELECT key, vec FROM vectors WHERE model=? AND key IN ({','.join('?' * len(part))})",
                [self.model_id, *part])
            for key, blob in rows:
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO vectors VALUES (?,?,?)",
                                  [(self.model_id, k, v.astype(np.float32).tobytes()) for k, v in items.items()])

    def embed(self, embedder: Embedder, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Vectors for `texts`, computing only those not cached."""
        keys = [text_key(t) for t in texts]
        have = self.get_many(keys)
        missing = {k: t for k, t in zip(keys, texts) if k not in have}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            vecs = embedder.encode(list(missing.values()), progress=progress)
            new = dict(zip(missing.keys(), vecs))
            self.put_many(new)
            have.update(new)
        if not keys:
            return np.zeros((0, embedder.dim), dtype=np.float32)
        return np.stack([have[k] for k in keys])

    def close(self) -> None:
        self.conn.close()
