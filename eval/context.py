"""How much of what retrieval hands over is the gold paragraph, and whether the answer is in it.

Texts are compared after removing whitespace (and a trailing "…" of a cut article), so line
breaks added by parsing, cleaning or chunking do not matter. A hit's overlap with the gold
paragraph is the longest piece they share as contiguous text: the whole paragraph inside the hit,
the hit inside the paragraph, or the hit's end running into the paragraph's start (or its start
continuing the paragraph's end), at least `MIN_OVERLAP` characters.

Per question, for the top-k hits (what `kb search` returns) and for the text the answer chain
hands the LLM (the same hits cut to a character budget, `serve.chain.clip_context`):
- `precision`: the share of the returned characters that come from the gold paragraph;
- `chars`: the characters returned;
- `answer_in`: a gold answer lies inside the part that comes from the gold paragraph (an answer
  string that merely occurs in another passage does not count).

When the question names its paragraph's document (`doc`), only hits from that document count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_OVERLAP = 8


def norm(text: str) -> str:
    """Whitespace removed, lower case."""
    return "".join(text.split()).lower()


def overlap(text: str, gold: str) -> str:
    """The normalised text that `text` and the gold paragraph share (see the module docstring)."""
    t, g = norm(text).rstrip("…"), norm(gold)
    if not t or not g:
        return ""
    if g in t:
        return g
    if t in g:
        return t
    best = ""
    for i in range(max(1, len(t) - len(g) + 1), len(t) - MIN_OVERLAP + 1):  # t's end = g's start
        if g.startswith(t[i:]):
            best = t[i:]
            break
    for j in range(min(len(t), len(g)) - 1, max(MIN_OVERLAP, len(best) + 1) - 1, -1):  # t's start = g's end
        if g.endswith(t[:j]):
            best = t[:j]
            break
    return best


@dataclass
class ContextScore:
    chars: int
    gold_chars: int
    answer_in: bool

    @property
    def precision(self) -> float:
        return self.gold_chars / self.chars if self.chars else 0.0


def score_texts(texts: Sequence[str], gold: str, answers: Sequence[str],
                same_doc: Sequence[bool] | None = None) -> ContextScore:
    """Characters, characters from the gold paragraph, and whether an answer is in that part.
    With `same_doc` (per text: does it come from the gold paragraph's document), only those texts
    can overlap the paragraph: a short sentence of another document that happens to occur in the
    paragraph is not gold text."""
    same = same_doc if same_doc is not None else [True] * len(texts)
    parts = [overlap(t, gold) if ok else "" for t, ok in zip(texts, same)]
    ans = [norm(a) for a in answers if norm(a)]
    return ContextScore(sum(len(norm(t).rstrip("…")) for t in texts), sum(len(p) for p in parts),
                        any(a in p for p in parts for a in ans))
