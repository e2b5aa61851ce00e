"""The compliance step: every answer is checked before it leaves.

Fallback when a sensitive word appears (question or answer), when retrieval is weak, when the
model says the context does not hold the answer, when the answer is not grounded in the context,
or (optionally) when it is too far from every approved reply. The fallback is the approved reply
for the dialogue stage and the question's language (a universal one when no stage matches).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ingest.nsp import terms
from ingest.sentences import is_chinese
from kb.settings import REPO_ROOT, ComplianceConfig


@dataclass
class ApprovedReply:
    text: str
    intent: str = "fallback"
    stage: str = "*"
    lang: str = "en"


@dataclass
class Verdict:
    fallback: bool
    reason: str | None
    answer: str
    approved_match: dict | None = None


def term_share(part: str, whole_terms: set[str]) -> float:
    """Share of `part`'s content terms that occur in `whole_terms`."""
    t = terms(part)
    return len(t & whole_terms) / len(t) if t else 0.0


class ReplyLibrary:
    """Approved replies, embedded in their own FAISS index."""

    def __init__(self, replies: list[ApprovedReply], embedder=None) -> None:
        if not replies:
            raise ValueError("the approved-reply library is empty")
        self.replies = replies
        self.embedder = embedder
        self.index = None
        if embedder is not None:
            import faiss

            vecs = embedder.encode([r.text for r in replies])
            self.index = faiss.IndexFlatIP(vecs.shape[1])
            self.index.add(vecs)

    @classmethod
    def load(cls, path: str | Path, embedder=None) -> ReplyLibrary:
        p = Path(path)
        if not p.is_absolute() and not p.is_file():
            p = REPO_ROOT / p
        rows = yaml.safe_load(p.read_text(encoding="utf-8")) or []
        replies = []
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or not str(r.get("text", "")).strip():
                raise ValueError(f"{p}: entry {i} needs a 'text'")
            replies.append(ApprovedReply(str(r["text"]), str(r.get("intent", "fallback")),
                                         str(r.get("stage", "*")), str(r.get("lang", "en"))))
        return cls(replies, embedder)

    def pick(self, intent: str, stage: str | None, lang: str) -> str:
        cands = [r for r in self.replies if r.intent == intent] or [r for r in self.replies if r.intent == "fallback"]
        for want_stage in (stage, "*"):
            for want_lang in (lang, None):
                for r in cands:
                    if r.stage == want_stage and (want_lang is None or r.lang == want_lang):
                        return r.text
        return cands[0].text if cands else self.replies[0].text

    def nearest(self, text: str) -> tuple[ApprovedReply, float] | None:
        if self.index is None:
            return None
        scores, ids = self.index.search(self.embedder.encode([text]), 1)
        return self.replies[int(ids[0, 0])], float(scores[0, 0])


class Compliance:
    def __init__(self, cfg: ComplianceConfig, library: ReplyLibrary) -> None:
        self.cfg = cfg
        self.library = library

    def check(self, question: str, answer: str, context: list[str], confidence: float, *,
              refused: bool, extractive: bool, stage: str | None = None) -> Verdict:
        lang = "zh" if is_chinese(question) else "en"
        for w in self.cfg.sensitive_words:
            if w and (w.lower() in question.lower() or w.lower() in answer.lower()):
                return Verdict(True, f"sensitive word {w!r}", self.library.pick("sensitive", stage, lang))
        fallback = lambda reason: Verdict(True, reason, self.library.pick("fallback", stage, lang))  # noqa: E731
        if confidence < self.cfg.min_retrieval_confidence:
            return fallback(f"weak retrieval (confidence {confidence:.2f} < {self.cfg.min_retrieval_confidence:.2f})")
        if refused:
            return fallback("the retrieved context does not contain the answer")
        if not extractive:
            ctx_terms = set().union(*(terms(c) for c in context)) if context else set()
            grounding = term_share(answer, ctx_terms)
            if grounding < self.cfg.min_grounding:
                return fallback(f"ungrounded answer ({grounding:.2f} of its terms in the context "
                                f"< {self.cfg.min_grounding:.2f})")
        match = None
        near = self.library.nearest(answer)
        if near is not None:
            match = {"text": near[0].text, "intent": near[0].intent, "score": round(near[1], 4)}
            if self.cfg.require_approved and near[1] < self.cfg.approved_min:
                return Verdict(True, f"not close to an approved reply ({near[1]:.2f} < {self.cfg.approved_min:.2f})",
                               self.library.pick("fallback", stage, lang), match)
        return Verdict(False, None, answer, match)


def retrieval_confidence(question: str, hits, coverage: float) -> float:
    """How well the best hit supports the question: the share of the question's content terms it
    contains, or its vector similarity scaled by the embedder's coverage of the question."""
    best = 0.0
    for h in hits:
        lex = term_share(question, terms(h.text))
        vec = (h.vector_score or 0.0) * coverage
        best = max(best, lex, vec)
    return float(np.clip(best, 0.0, 1.0))
