"""Plain text (.txt, .rst) into paragraphs, titles and list items without losing a character.

unstructured's `partition_text` counts "·" (U+00B7, the middle dot of transliterated names such as
安东尼·霍普金斯) among its bullet glyphs: its paragraph grouper splits a line at every "·", the
piece holding only the dot is dropped as an empty bullet, and a line that starts with "·" loses
it as a bullet marker. A Chinese paragraph has no spaces, so every line counts as "short" and the
pieces become separate (often Title) elements. This module splits paragraphs itself and takes a
glyph for a bullet only at the start of a line; "·", "-", "*", "+" and "–" only when whitespace
follows them (so "·霍普金斯" at a line start stays text).
"""

from __future__ import annotations

import re
from typing import Any

_BULLET = re.compile(
    r"^[ \t]*(?:[\u2022\u25cf\u25aa\u25e6\u2023\u2043\u2219\u25a0\u25a1\u27a2\u27a4\u0095\uf0b7]"
    r"[ \t]*|[-*+\u2013\u00b7][ \t]+)(?=\S)")
"""A bulleted line: an unambiguous bullet glyph, or an ambiguous one followed by whitespace."""
_SENTENCE_END = ("。", "！", "？", "；", "…", "」", "”")
_SHORT_WORDS = 5
_SHORT_CHARS = 25
_BLANK_RATIO = 0.1
"""Fewer blank lines than this share of all lines: every line is its own paragraph (as
unstructured's auto_paragraph_grouper decides)."""


def bullet_text(line: str) -> str | None:
    """The text of a bulleted line without its bullet, or None when the line is not bulleted."""
    m = _BULLET.match(line)
    return line[m.end():].strip() if m else None


def paragraphs(text: str) -> list[tuple[str, bool]]:
    """(text, is_list_item) pieces of `text`, in order: blank-line paragraphs (or lines, when the
    text hardly has blank lines), bulleted lines as items (with their continuation lines), and
    paragraphs of short lines ("Apache License" / "Version 2.0") one line each."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blank = sum(1 for ln in lines if not ln.strip())
    if blank / max(len(lines), 1) < _BLANK_RATIO:
        groups = [[ln] for ln in lines if ln.strip()]
    else:
        groups, cur = [], []
        for ln in lines:
            if ln.strip():
                cur.append(ln)
            elif cur:
                groups.append(cur)
                cur = []
        if cur:
            groups.append(cur)
    out: list[tuple[str, bool]] = []
    for group in groups:
        out.extend(_split_group(group))
    return out


def _split_group(lines: list[str]) -> list[tuple[str, bool]]:
    if any(bullet_text(ln) is not None for ln in lines):
        out: list[tuple[str, bool]] = []
        for ln in lines:
            item = bullet_text(ln)
            if item is not None:
                out.append((item, True))
            elif out and out[-1][1]:
                out[-1] = (out[-1][0] + "\n" + ln.strip(), True)
            else:
                out.append((ln.strip(), False))
        return out
    if len(lines) > 1 and all(_short(ln) for ln in lines):
        return [(ln.strip(), False) for ln in lines]
    return [("\n".join(ln.strip() for ln in lines), False)]


def _short(line: str) -> bool:
    s = line.strip()
    return len(s.split()) < _SHORT_WORDS and len(s) <= _SHORT_CHARS and not s.endswith(_SENTENCE_END)


def partition_plain_text(text: str) -> list[Any]:
    """unstructured elements (Title, NarrativeText, ListItem, Text) for plain text, every
    non-whitespace character kept in order except the bullets of list items."""
    from unstructured.documents.elements import ListItem, NarrativeText, Text, Title
    from unstructured.partition.text_type import (
        is_possible_narrative_text,
        is_possible_numbered_list,
        is_possible_title,
    )

    elements: list[Any] = []
    for para, is_item in paragraphs(text):
        if is_item or is_possible_numbered_list(para):
            elements.append(ListItem(text=para))
        elif para.endswith(_SENTENCE_END) or is_possible_narrative_text(para):
            elements.append(NarrativeText(text=para))
        elif is_possible_title(para):
            elements.append(Title(text=para))
        else:
            elements.append(Text(text=para))
    return elements
