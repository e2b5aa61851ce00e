"""Clean parsed blocks: whitespace, broken PDF lines, repeated headers/footers, junk."""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict

import ftfy

from ingest.sentences import CJK_CHAR
from ingest.types import Block

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_HYPHEN_BREAK = re.compile(r"(\w)-\n(\w)")
_DIGITS = re.compile(r"\d+")


def normalize_text(text: str, keep_lines: bool = False) -> str:
    """Mojibake repaired (ftfy), NFC, no control characters, one space between words, joined lines."""
    # full-width punctuation is how Chinese is written: keep it (fix_character_width off)
    text = ftfy.fix_text(text, normalization="NFC", uncurl_quotes=False, fix_character_width=False)
    text = unicodedata.normalize("NFC", text)
    text = _CTRL.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = _HYPHEN_BREAK.sub(r"\1\2", text)
    lines = [ln.strip() for ln in text.split("\n")]
    if keep_lines:
        return "\n".join(ln for ln in lines if ln)
    out = ""
    for ln in lines:
        if not ln:
            if out and not out.endswith("\n\n"):
                out += "\n\n"
            continue
        if not out or out.endswith("\n"):
            out += ln
        elif CJK_CHAR.match(out[-1]) or CJK_CHAR.match(ln[0]):
            out += ln  # Chinese has no spaces between words
        else:
            out += " " + ln
    return out.strip()


def _is_junk(text: str, min_chars: int, structured: bool = False) -> bool:
    alnum = sum(ch.isalnum() for ch in text)
    if alnum < min_chars:
        return True
    tokens = text.split()
    # rotated or letter-spaced PDF text ("0 2 0 2", "p e S"): mostly one-character tokens
    if not structured and len(tokens) >= 3 and not CJK_CHAR.search(text):
        singles = sum(len(t) == 1 for t in tokens)
        if singles / len(tokens) > 0.6:
            return True
    return False


def drop_repeated(blocks: list[Block], min_pages: int) -> list[Block]:
    """Remove running headers/footers: short lines repeated on many pages.

    A line counts when the same text recurs, or, at the top or bottom of a page, when it recurs
    with only its numbers changed ("Page 3 of 9").
    """
    pages = {b.page for b in blocks if b.page is not None}
    if len(pages) < min_pages:
        return blocks
    by_page: dict[int, list[int]] = defaultdict(list)
    for i, b in enumerate(blocks):
        if b.page is not None:
            by_page[b.page].append(i)
    edges = {ix[0] for ix in by_page.values()} | {ix[-1] for ix in by_page.values()}

    def keys(i: int) -> list[str]:
        b = blocks[i]
        if b.page is None or len(b.text) > 120 or b.kind == "table":
            return []
        k = ["=" + b.text.lower()]
        if i in edges:
            k.append("#" + _DIGITS.sub("#", b.text.lower()))
        return k

    seen: dict[str, set[int]] = defaultdict(set)
    for i, b in enumerate(blocks):
        for k in keys(i):
            seen[k].add(b.page)  # type: ignore[arg-type]
    need = max(min_pages, len(pages) // 2)
    repeated = {k for k, v in seen.items() if len(v) >= need}
    return [b for i, b in enumerate(blocks) if not any(k in repeated for k in keys(i))]


def clean_blocks(blocks: list[Block], drop_repeated_headers: bool = True,
                 repeat_min_pages: int = 3, min_chars: int = 2) -> list[Block]:
    """Normalise every block and drop empty, junk and repeated header/footer blocks."""
    out: list[Block] = []
    for b in blocks:
        keep_lines = b.kind in {"table", "code"}
        text = normalize_text(b.text, keep_lines=keep_lines)
        if not text or _is_junk(text, min_chars, keep_lines):
            continue
        out.append(Block(text=text, kind=b.kind, page=b.page, depth=b.depth, table=b.table))
    if drop_repeated_headers:
        out = drop_repeated(out, repeat_min_pages)
    return out
