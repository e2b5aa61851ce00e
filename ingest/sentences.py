"""Sentence splitting for Chinese and English (and mixed) text."""

from __future__ import annotations

import re

CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
"""One CJK character (Han, kana, Hangul)."""
# Chinese/Japanese full stops end a sentence wherever they are; closing quotes stay with it.
_ZH_END = re.compile(r"([。！？!?；;…]+[”’」』）)\]\"']*)")
# English: . ! ? followed by space and an upper-case letter, digit or quote.
_EN_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9\u4e00-\u9fff])")
_ABBREV = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|Inc|Ltd|Co|Corp|No|Fig|Eq|al|approx|Dept|Jan|Feb|"
    r"Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|U\.S|e\.g|i\.e)|\b[A-Z])\.$"
)


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among non-space characters."""
    chars = [c for c in text if not c.isspace()]
    return sum(1 for c in chars if CJK_CHAR.match(c)) / len(chars) if chars else 0.0


def is_chinese(text: str) -> bool:
    """Whether more than 30% of the text's non-space characters are CJK."""
    return cjk_ratio(text) > 0.3


def split_sentences(text: str, min_chars: int = 1) -> list[str]:
    """Split `text` into sentences; a piece shorter than `min_chars` joins its predecessor."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n|\n(?=[-*•·]\s)", text):
        para = para.strip()
        if not para:
            continue
        for piece in _split_zh(para):
            out.extend(_split_en(piece))
    merged: list[str] = []
    for s in out:
        if merged and len(s) < min_chars:
            merged[-1] = _join(merged[-1], s)
        else:
            merged.append(s)
    return merged


def _split_zh(text: str) -> list[str]:
    parts = _ZH_END.split(text)
    sents: list[str] = []
    for i in range(0, len(parts), 2):
        s = parts[i] + (parts[i + 1] if i + 1 < len(parts) else "")
        if s.strip():
            sents.append(s.strip())
    return sents


def _split_en(text: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    for m in _EN_END.finditer(text):
        candidate = text[start : m.start()].rstrip()
        if _ABBREV.search(candidate):
            continue
        pieces.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        pieces.append(tail)
    return [p for p in pieces if p]


def _join(a: str, b: str) -> str:
    if is_chinese(a[-1:] + b[:1]):
        return a + b
    return f"{a} {b}"
