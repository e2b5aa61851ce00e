"""Sentence embeddings (sentence-transformers, resolved offline) with a cache per knowledge base.

Every text is embedded as a `query` (what a user asks) or a `passage` (what is searched). A model
whose sentence-transformers config defines those prompts (E5: `query: ` / `passage: `) gets the
prompt in front of the text; a model without them (MiniLM) embeds both kinds alike.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from kb.models import avoid_cudnn_attention, pick_device, resolve_model
from kb.sqlutil import in_batches

Kind = Literal["query", "passage"]
KINDS: tuple[str, ...] = ("query", "passage")


def model_prompts(model) -> dict[str, str]:
    """The non-empty `query` / `passage` prompts of a SentenceTransformer; {} when it has none."""
    prompts = getattr(model, "prompts", None) or {}
    return {k: prompts[k] for k in KINDS if prompts.get(k)}


def check_kind(kind: str) -> str:
    """`kind` when it is one of KINDS; ValueError otherwise."""
    if kind not in KINDS:
        raise ValueError(f"embedding kind must be one of {KINDS}, not {kind!r}")
    return kind


class Embedder:
    """Batched, L2-normalised embeddings, on GPU when there is one."""

    def __init__(self, spec: str, device: str = "auto", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self.spec = spec
        self.path = resolve_model(spec, "embedder")
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(self.path), device=self.device)
        avoid_cudnn_attention(self.device)
        if self.device.startswith("cuda"):
            self.model.half()
        self.dim = int(self.model.get_embedding_dimension())
        self.prompts = model_prompts(self.model)
        self._null: float | None = None

    @property
    def model_id(self) -> str:
        """Identifies the weights (the spec and the folder's config) and the prompts, for index
        version checks."""
        cfg = self.path / "config.json"
        digest = hashlib.sha1(cfg.read_bytes()).hexdigest()[:10] if cfg.is_file() else "-"
        st = self.path / "model.safetensors"
        size = st.stat().st_size if st.is_file() else 0
        base = f"{self.spec}#{digest}:{size}"
        return f"{base}|prompts={json.dumps(self.prompts, sort_keys=True)}" if self.prompts else base

    def cache_id(self, kind: Kind) -> str:
        """Cache key of `kind`'s vectors: a query and a passage vector of one text differ when
        the model has prompts, and are the same vector when it has none."""
        check_kind(kind)
        return f"{self.model_id}|{kind}" if self.prompts else self.model_id

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

    def encode(self, texts: Sequence[str], kind: Kind, progress: bool = False) -> np.ndarray:
        """L2-normalised vectors of `texts` embedded as `kind` (its prompt, if the model has one)."""
        prompt = self.prompts.get(check_kind(kind))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(list(texts), prompt=prompt, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress)
        return np.asarray(vecs, dtype=np.float32)

    def null_similarity(self) -> float:
        """Mean cosine between questions and passages on unrelated topics in the same language: the similarity this
        model gives to text that has nothing to do with the question (about 0 for MiniLM, about
        0.8 for E5). Confidence is measured above it, so one threshold serves every model."""
        if self._null is None:
            q = self.encode_queries([a for a, _ in NULL_PAIRS])
            p = self.encode_passages([b for _, b in NULL_PAIRS])
            sims = q @ p.T
            zh = np.array([any("\u4e00" <= ch <= "\u9fff" for ch in a) for a, _ in NULL_PAIRS])
            unrelated = (zh[:, None] == zh[None, :]) & ~np.eye(len(NULL_PAIRS), dtype=bool)
            self._null = float(np.clip(sims[unrelated].mean(), 0.0, 0.99))
        return self._null

    def encode_queries(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        return self.encode(texts, "query", progress)

    def encode_passages(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        return self.encode(texts, "passage", progress)


NULL_PAIRS: tuple[tuple[str, str], ...] = (
    ("How many days of annual leave do new employees get?", "New employees receive 15 days of paid annual leave."),
    ("What is the boiling point of water at sea level?", "At sea level, water boils at 100 degrees Celsius."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
    ("How do I reset my router?", "Hold the reset button on the back of the router for ten seconds."),
    ("长城有多长？", "长城全长约两万一千公里，横跨中国北方。"),
    ("报销需要在多少天内提交？", "员工应在费用发生后三十天内提交报销申请。"),
    ("熊猫主要吃什么？", "大熊猫的食物几乎全部是竹子。"),
    ("股票市场什么时候开盘？", "上海证券交易所上午九点半开盘。"),
)
"""Question/passage pairs on eight unrelated topics, four in each language; a question and
another topic's passage in the same language are unrelated (cross-lingual pairs score lower
still, so they are left out of the null)."""


def text_key(text: str) -> str:
    """The SHA-1 hex digest of a text (its embedding cache key)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """text → vector for one embedding model, in SQLite, so unchanged text is never re-embedded.
    `model_id` is `Embedder.cache_id(kind)`: query and passage vectors never mix."""

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
        for key, blob in in_batches(self.conn, "SELECT key, vec FROM vectors WHERE model=? AND key IN ({})", uniq,
                                    (self.model_id,)):
            found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO vectors VALUES (?,?,?)",
                                  [(self.model_id, k, v.astype(np.float32).tobytes()) for k, v in items.items()])

    def embed(self, embedder: Embedder, texts: Sequence[str], kind: Kind, progress: bool = False) -> np.ndarray:
        """Vectors for `texts` embedded as `kind`, computing only those not cached."""
        if self.model_id != embedder.cache_id(kind):
            raise ValueError(f"this cache holds {self.model_id!r}, not {embedder.cache_id(kind)!r}")
        keys = [text_key(t) for t in texts]
        have = self.get_many(keys)
        missing = {k: t for k, t in zip(keys, texts) if k not in have}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            vecs = embedder.encode(list(missing.values()), kind, progress=progress)
            new = dict(zip(missing.keys(), vecs))
            self.put_many(new)
            have.update(new)
        if not keys:
            return np.zeros((0, embedder.dim), dtype=np.float32)
        return np.stack([have[k] for k in keys])

    def close(self) -> None:
        self.conn.close()
