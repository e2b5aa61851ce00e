"""Content terms of a text, language-neutral: what lexical overlap is counted in (chunking's
next-sentence features, the answer chain's support check, compliance, segmentation eval)."""

from __future__ import annotations

import re
from functools import cache

_ZH_STOP_CHARS = set("的了是在和与及或等对为以于其这那之也并而被将从由到个有一不我你他她它们中上下")
_LATIN = re.compile(r"[A-Za-z][A-Za-z0-9]+")
_CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")


@cache
def en_stopwords() -> frozenset[str]:
    """scikit-learn's English stop words."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def terms(text: str) -> set[str]:
    """Language-neutral content terms: Chinese character bigrams (no function characters) and
    English non-stopwords cut to 5 letters (a cheap stem: coffee/coffees, cherry/cherries)."""
    out: set[str] = set()
    for run in _CJK_RUN.findall(text):
        chars = [c for c in run if c not in _ZH_STOP_CHARS]
        out.update(chars[i] + chars[i + 1] for i in range(len(chars) - 1))
    stop = en_stopwords()
    out.update(w.lower()[:5] for w in _LATIN.findall(text) if w.lower() not in stop)
    return out
