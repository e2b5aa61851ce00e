"""The compliance step: every answer is checked before it leaves.

Fallback when a sensitive word appears (question or answer), when retrieval is weak, when the
model says the context does not hold the answer, when the answer is not grounded in the context,
or (optionally) when it is too far from every approved reply. The fallback is the approved reply
for the dialogue stage and the question's language (a universal one when no stage matches).

On a stream: the question and retrieval are checked before generation starts (`precheck`);
`StreamGuard` checks every piece for sensitive words and holds back the text a word could still
be completing; refusal and grounding are checked on the whole reply at the end (`check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ingest.sentences import is_chinese
from ingest.text import terms
from kb.settings import REPO_ROOT, ComplianceConfig
from serve.injection import repeats

SIMILARITY_KIND = "query"
"""An answer and an approved reply are compared like with like (a symmetric task), so both are
embedded as the same kind; E5's model card asks for `query: ` on both sides of such tasks."""


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

    def __init__(self, replies: list[ApprovedReply], embedder=None, vectors: np.ndarray | None = None) -> None:
        """`vectors`: the replies' embeddings (as SIMILARITY_KIND, by `embedder`) when already known."""
        if not replies:
            raise ValueError("the approved-reply library is empty")
        self.replies = replies
        self.embedder = embedder
        self.index = None
        if embedder is not None:
            import faiss

            vecs = vectors if vectors is not None else embedder.encode([r.text for r in replies], SIMILARITY_KIND)
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

    def extended(self, replies: list[ApprovedReply], vectors: np.ndarray) -> ReplyLibrary:
        """A new library of these replies and `replies` (e.g. a KB's FAQ answers, intent "faq"),
        whose `vectors` the same embedder made as SIMILARITY_KIND: `nearest` considers them too."""
        if not replies:
            return self
        if self.index is None:
            return ReplyLibrary(self.replies + replies)
        own = self.index.reconstruct_n(0, self.index.ntotal)
        return ReplyLibrary(self.replies + replies, self.embedder,
                            np.vstack([own, np.asarray(vectors, dtype=np.float32)]))

    def pick(self, intent: str, stage: str | None, lang: str) -> str:
        cands = [r for r in self.replies if r.intent == intent] or [r for r in self.replies if r.intent == "fallback"]
        for want_stage in (stage, "*"):
            for want_lang in (lang, None):
                for r in cands:
                    if r.stage == want_stage and (want_lang is None or r.lang == want_lang):
                        return r.text
        return cands[0].text if cands else self.replies[0].text

    def nearest(self, text: str, stage: str | None = None) -> tuple[ApprovedReply, float] | None:
        """The approved reply closest to `text` among those for `stage` or for every stage ("*");
        with no stage given, among all."""
        if self.index is None:
            return None
        scores, ids = self.index.search(self.embedder.encode([text], SIMILARITY_KIND), len(self.replies))
        for score, i in zip(scores[0], ids[0]):
            if i >= 0 and (stage is None or self.replies[int(i)].stage in ("*", stage)):
                return self.replies[int(i)], float(score)
        return None


def find_sensitive(text: str, words: list[str]) -> str | None:
    """The first of `words` that occurs in `text` (case-insensitive), or None."""
    low = text.lower()
    return next((w for w in words if w and w.lower() in low), None)


class StreamGuard:
    """Sensitive words on a stream: `feed` each piece and send what it returns. The last
    len(longest word) - 1 characters (and trailing whitespace) are held back until more text or
    the end arrives, so no part of a sensitive word split across pieces is ever sent; once a word
    appears, `hit` names it and nothing more is released. While the text is still the start of
    one of `quiet` (the refusal sentence, which becomes the fallback), nothing is released."""

    def __init__(self, words: list[str], quiet: list[str] | tuple[str, ...] = ()) -> None:
        self.words = [w for w in words if w]
        self.quiet = [q for q in quiet if q]
        self.hold = max((len(w) for w in self.words), default=1) - 1
        self.text, self.sent, self.hit = "", 0, None

    def feed(self, piece: str) -> str:
        if self.hit is not None:
            return ""
        if not self.text:
            piece = piece.lstrip()
        self.text += piece
        self.hit = find_sensitive(self.text, self.words)
        if self.hit is not None or (self.sent == 0 and any(q.startswith(self.text.rstrip()) for q in self.quiet)):
            return ""
        end = max(self.sent, min(len(self.text) - self.hold, len(self.text.rstrip())))
        out, self.sent = self.text[self.sent:end], end
        return out

    def rest(self) -> str:
        """What is still held back (call at the end, after the final check passed)."""
        if self.hit is not None:
            return ""
        end = len(self.text.rstrip())
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


class Compliance:
    def __init__(self, cfg: ComplianceConfig, library: ReplyLibrary) -> None:
        self.cfg = cfg
        self.library = library

    def sensitive(self, question: str, answer: str, stage: str | None = None) -> Verdict | None:
        """The sensitive-word fallback when the question or the answer holds a sensitive word (the
        reason names a word of the question, never one of the withheld answer)."""
        words = self.cfg.sensitive_words
        w = find_sensitive(question, words)
        reason = f"sensitive word {w!r} in the question"
        if w is None:
            w, reason = find_sensitive(answer, words), "sensitive word in the answer"
        if w is None:
            return None
        return Verdict(True, reason, self.library.pick("sensitive", stage, "zh" if is_chinese(question) else "en"))

    def precheck(self, question: str, confidence: float, stage: str | None = None) -> Verdict | None:
        """What is decided before generation: a sensitive question, weak retrieval; None: generate."""
        v = self.sensitive(question, "", stage)
        if v is not None:
            return v
        if confidence < self.cfg.min_retrieval_confidence:
            floor = self.cfg.min_retrieval_confidence
            return Verdict(True, f"weak retrieval (confidence {confidence:.2f} < {floor:.2f})",
                           self.library.pick("fallback", stage, "zh" if is_chinese(question) else "en"))
        return None

    def check(self, question: str, answer: str, context: list[str], confidence: float, *,
              refused: bool, extractive: bool, stage: str | None = None, instructions: str = "") -> Verdict:
        """The verdict on a whole reply; `instructions` is the system prompt, which a reply must not
        repeat (a prompt-injection symptom)."""
        lang = "zh" if is_chinese(question) else "en"
        early = self.precheck(question, confidence, stage) or self.sensitive(question, answer, stage)
        if early is not None:
            return early
        fallback = lambda reason: Verdict(True, reason, self.library.pick("fallback", stage, lang))  # noqa: E731
        if refused:
            return fallback("the retrieved context does not contain the answer")
        if instructions and repeats(answer, instructions):
            return fallback("the answer repeats the assistant's instructions")
        if not extractive:
            ctx_terms = set().union(*(terms(c) for c in context)) if context else set()
            grounding = term_share(answer, ctx_terms)
            if grounding < self.cfg.min_grounding:
                return fallback(f"ungrounded answer ({grounding:.2f} of its terms in the context "
                                f"< {self.cfg.min_grounding:.2f})")
        match = None
        near = self.library.nearest(answer, stage)
        if near is not None:
            match = {"text": near[0].text, "intent": near[0].intent, "score": round(near[1], 4)}
            if self.cfg.require_approved and near[1] < self.cfg.approved_min:
                return Verdict(True, f"not close to an approved reply ({near[1]:.2f} < {self.cfg.approved_min:.2f})",
                               self.library.pick("fallback", stage, lang), match)
        return Verdict(False, None, answer, match)


def question_confidence(embedder, question: str, hits) -> float:
    """`retrieval_confidence` with the embedder's coverage of the question and its null similarity."""
    return retrieval_confidence(question, hits, float(embedder.coverage([question])[0]), embedder.null_similarity())


def retrieval_confidence(question: str, hits, coverage: float, null: float = 0.0) -> float:
    """How well the best hit supports the question: the share of the question's content terms it
    contains, or its vector similarity above the embedder's similarity for unrelated text (`null`,
    `Embedder.null_similarity`), scaled by the embedder's coverage of the question."""
    best = 0.0
    for h in hits:
        lex = term_share(question, terms(h.text))
        vec = max(0.0, ((h.vector_score or 0.0) - null) / (1.0 - null)) * coverage
        best = max(best, lex, vec)
    return float(np.clip(best, 0.0, 1.0))
