"""Answer-vs-gold text metrics: exact match, token F1 and ROUGE-L, with mixed Chinese/English
tokens (each CJK character is a token, as in the CMRC 2018 evaluation; Latin words and numbers
are tokens). Punctuation, whitespace, case and citation markers like [2] are ignored."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_CITATION = re.compile(r"\[\d+(?:\s*[,，]\s*\d+)*\]")
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+(?:[.'][A-Za-z0-9]+)*")
_PUNCT = set(string.punctuation) | set("，。、；：？！“”‘’（）《》【】—…·「」『』〈〉￥％")


def strip_citations(text: str) -> str:
    """`text` without citation markers such as [1] or [1, 2]."""
    return _CITATION.sub("", text)


def tokens(text: str) -> list[str]:
    """Lower-cased tokens of `text` without citations: each CJK character, and ASCII words and numbers."""
    return [t.lower() for t in _TOKEN.findall(strip_citations(text))]


def normalize(text: str) -> str:
    """`text` without citations, lower-cased, without whitespace and punctuation (for exact match)."""
    return "".join(c for c in strip_citations(text).lower() if not c.isspace() and c not in _PUNCT)


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    p = normalize(pred)
    return float(any(p == normalize(g) for g in golds))


def contains_answer(pred: str, golds: Sequence[str]) -> float:
    """The gold answer occurs inside the prediction (fairer to long extractive answers than EM)."""
    p = normalize(pred)
    return float(any(normalize(g) and normalize(g) in p for g in golds))


def f1(pred: str, golds: Sequence[str]) -> float:
    """Best token-level F1 over the gold answers."""
    pt = tokens(pred)
    best = 0.0
    for g in golds:
        gt = tokens(g)
        common = sum((Counter(pt) & Counter(gt)).values())
        if common:
            prec, rec = common / len(pt), common / len(gt)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, golds: Sequence[str]) -> float:
    """Best ROUGE-L F-measure (longest common subsequence of tokens) over the gold answers."""
    pt = tokens(pred)
    best = 0.0
    for g in golds:
        gt = tokens(g)
        lcs = _lcs(pt, gt) if pt and gt else 0
        if lcs:
            prec, rec = lcs / len(pt), lcs / len(gt)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best
