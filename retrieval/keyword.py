"""BM25 keyword search (bm25s) over jieba tokens for Chinese and word tokens for English."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ingest.keyinfo import tokens


def tokenize(text: str) -> list[str]:
    """Search tokens: the key-information tokenizer, plus single CJK characters of short queries."""
    toks = tokens(text)
    return toks or [w for w in text.lower().split() if w]


class KeywordIndex:
    """BM25 over documents identified by int ids."""

    def __init__(self, retriever, ids: np.ndarray) -> None:
        self.retriever = retriever
        self.ids = np.asarray(ids, dtype=np.int64)

    @classmethod
    def build(cls, token_lists: Sequence[list[str]], ids: Sequence[int]) -> KeywordIndex:
        import bm25s

        r = bm25s.BM25()
        if token_lists:
            r.index([t or ["\u2205"] for t in token_lists], show_progress=False)
        return cls(r, np.asarray(ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        if not len(self):
            return []
        vocab = self.retriever.vocab_dict
        q = [t for t in tokenize(query) if t in vocab]
        if not q:
            return []
        docs, scores = self.retriever.retrieve([q], k=min(k, len(self)), show_progress=False)
        return [(int(self.ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if len(self):
            self.retriever.save(str(folder / "bm25"))
        np.save(folder / "bm25_ids.npy", self.ids)

    @classmethod
    def load(cls, folder: Path) -> KeywordIndex:
        import bm25s

        ids = np.load(folder / "bm25_ids.npy")
        r = bm25s.BM25.load(str(folder / "bm25")) if len(ids) else bm25s.BM25()
        return cls(r, ids)


def tokens_json(text: str) -> str:
    """The text's keyword-index tokens as a JSON list."""
    return json.dumps(tokenize(text), ensure_ascii=False)
