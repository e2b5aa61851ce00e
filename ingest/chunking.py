"""Cut documents into chunks: semantic (BERT next-sentence prediction), fixed-size or one per sentence.

Both chunkers see the same units: sentences of text blocks, and whole tables, code blocks and
lists. A title starts a new section; chunks never cross a section.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ingest.sentences import CJK_CHAR, split_sentences
from ingest.tables import table_units
from ingest.types import Chunk, ParsedDocument, Unit


def to_units(doc: ParsedDocument, max_chars: int = 600, min_sentence_chars: int = 1,
             table_whole_chars: int | None = None, table_rows_per_unit: int = 1) -> list[Unit]:
    """Sentences and atomic blocks with their title path and section number.

    A table with its structure (`Block.table`) becomes row-wise units that repeat the column names
    (`ingest.tables.table_units`; whole when its grid is at most `table_whole_chars`, default
    `max_chars`), each its own section so that no chunker merges a row into other text, under
    the title path plus the table's caption."""
    units: list[Unit] = []
    titles: list[tuple[int, str]] = []  # (depth, text)
    section = 0
    pending_list: list[str] = []
    list_page: int | None = None
    b_prev_title, title_start = "", 0

    def path() -> tuple[str, ...]:
        return tuple(t for _, t in titles)

    def flush_list() -> None:
        nonlocal pending_list
        if pending_list:
            units.extend(_split_atomic("\n".join(pending_list), path(), list_page, section, max_chars))
            pending_list = []

    for b in doc.blocks:
        if b.kind != "list":
            flush_list()
        if b.kind == "title":
            if titles and titles[-1][0] >= b.depth and len(units) == title_start:
                # a heading with nothing under it (a short line taken for a title) keeps its text
                units.append(Unit(b_prev_title, path()[:-1], None, False, section))
            while titles and titles[-1][0] >= b.depth:
                titles.pop()
            titles.append((b.depth, b.text[:200]))
            b_prev_title, title_start = b.text, len(units)
            section += 1
        elif b.kind == "list":
            if not pending_list:
                list_page = b.page
            pending_list.append(f"- {b.text}")
        elif b.kind == "table" and b.table is not None:
            whole = max_chars if table_whole_chars is None else table_whole_chars
            caption = b.table.title[:200]
            tpath = path() + ((caption,) if caption and caption not in path() else ())
            for text in table_units(b.table, max_chars, whole, table_rows_per_unit):
                section += 1
                units.append(Unit(text, tpath, b.page, True, section))
            section += 1
        elif b.kind in {"table", "code"}:
            units.extend(_split_atomic(b.text, path(), b.page, section, max_chars))
        else:
            for s in split_sentences(b.text, min_chars=min_sentence_chars):
                for piece in _hard_wrap(s, max_chars):
                    units.append(Unit(piece, path(), b.page, False, section))
    flush_list()
    if titles and len(units) == title_start:
        units.append(Unit(b_prev_title, path()[:-1], None, False, section))
    return units


def _split_atomic(text: str, title_path: tuple[str, ...], page: int | None, section: int,
                  max_chars: int) -> list[Unit]:
    """Keep a table/list/code whole, or split it by lines (a table's header row repeated)."""
    if len(text) <= max_chars:
        return [Unit(text, title_path, page, True, section)]
    lines = text.split("\n")
    header = lines[0] if " | " in lines[0] else ""
    out: list[Unit] = []
    cur: list[str] = []
    for ln in lines:
        if cur and len("\n".join(cur)) + len(ln) + 1 > max_chars:
            out.append(Unit("\n".join(cur), title_path, page, True, section))
            cur = [header] if header and ln != header else []
        cur.extend(_hard_wrap(ln, max_chars))
    if cur:
        out.append(Unit("\n".join(cur), title_path, page, True, section))
    return out


def _hard_wrap(text: str, max_chars: int) -> list[str]:
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)] or [text]


def join_units(a: str, b: str, atomic: bool = False) -> str:
    """Text `a` followed by `b`: on a new line when `atomic`, else with `separator`."""
    if not a:
        return b
    if atomic:
        return f"{a}\n{b}"
    return a + separator(a, b) + b


def separator(a: str, b: str) -> str:
    """What goes between text `a` and text `b`: nothing after CJK or CJK punctuation, else a space."""
    return "" if CJK_CHAR.match(a[-1]) or CJK_CHAR.match(b[0]) or a[-1] in "。！？；" else " "


def section_text(units: Sequence[Unit]) -> str:
    """The units joined as `join_units` joins two (atomic units on their own paragraph), in one
    pass: joining them one at a time copies the text so far for every unit (quadratic on a huge
    section)."""
    parts: list[str] = []
    last = ""
    for u in units:
        text = u.text.strip() if u.atomic else u.text
        if not text:
            continue
        if last:
            parts.append("\n\n" if u.atomic else separator(last, text))
        parts.append(text)
        last = text
    return "".join(parts).strip()


class Chunker(Protocol):
    def chunk_many(self, docs: Sequence[list[Unit]]) -> list[list[Chunk]]: ...


class NSPChunker:
    """Merge adjacent units while P(next continues last) >= threshold (and under max_chars)."""

    def __init__(self, scorer, threshold: float = 0.5, temperature: float = 1.0,
                 max_chars: int = 600, min_chars: int = 40) -> None:
        self.scorer = scorer
        self.threshold = threshold
        self.temperature = temperature
        self.max_chars = max_chars
        self.min_chars = min_chars

    def chunk_many(self, docs: Sequence[list[Unit]]) -> list[list[Chunk]]:
        """Score every adjacent pair of every document in one batched pass, then merge."""
        pairs: list[tuple[str, str]] = []
        spans: list[tuple[int, int]] = []
        for units in docs:
            start = len(pairs)
            pairs.extend((units[i].text, units[i + 1].text) for i in range(len(units) - 1))
            spans.append((start, len(pairs)))
        probs = self.scorer.continue_probs(pairs, self.temperature) if pairs else np.zeros(0)
        return [self.merge(units, probs[s:e]) for units, (s, e) in zip(docs, spans)]

    def merge(self, units: list[Unit], probs: np.ndarray) -> list[Chunk]:
        """Chunks from units and the continuation probability of each adjacent pair."""
        groups: list[list[Unit]] = []
        for i, u in enumerate(units):
            if not groups:
                groups.append([u])
                continue
            cur = groups[-1]
            size = sum(len(x.text) for x in cur)
            same_section = cur[-1].section == u.section
            fits = size + len(u.text) <= self.max_chars
            wants = probs[i - 1] >= self.threshold or size < self.min_chars
            if same_section and fits and wants:
                cur.append(u)
            else:
                groups.append([u])
        return [_make_chunk(g, k) for k, g in enumerate(groups)]


class FixedChunker:
    """langchain's RecursiveCharacterTextSplitter over each section: the common baseline."""

    def __init__(self, size: int = 500, overlap: int = 50) -> None:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        self.splitter = RecursiveCharacterTextSplitter(
            chunk_size=size, chunk_overlap=overlap,
            separators=["\n\n", "\n", "。", "！", "？", ". ", "! ", "? ", "；", "; ", "，", ", ", " ", ""],
            keep_separator="end",
        )

    def chunk_many(self, docs: Sequence[list[Unit]]) -> list[list[Chunk]]:
        out: list[list[Chunk]] = []
        for units in docs:
            chunks: list[Chunk] = []
            sections: list[list[Unit]] = []
            for u in units:
                if sections and sections[-1][-1].section == u.section:
                    sections[-1].append(u)
                else:
                    sections.append([u])
            for sec in sections:
                for piece in self.splitter.split_text(section_text(sec)):
                    c = Chunk(piece.strip(), len(chunks), sec[0].title_path, sec[0].page)
                    c.sentences = split_sentences(c.text)
                    chunks.append(c)
            out.append(chunks)
        return out


class SentenceChunker:
    """Every unit its own chunk (a sentence, or a whole table, list or code block): the finest
    baseline, with no model."""

    def chunk_many(self, docs: Sequence[list[Unit]]) -> list[list[Chunk]]:
        return [[_make_chunk([u], k) for k, u in enumerate(units)] for units in docs]


def _make_chunk(group: list[Unit], ord_: int) -> Chunk:
    text = ""
    for u in group:
        text = join_units(text, u.text, u.atomic or (bool(text) and group[0].atomic))
    return Chunk(text=text, ord=ord_, title_path=group[0].title_path, page=group[0].page,
                 sentences=[u.text for u in group if not u.atomic])
