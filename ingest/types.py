"""Plain data passed between the ingestion steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ingest.tables import Table

BlockKind = Literal["title", "text", "list", "table", "code"]
Level = Literal["article", "segment", "sentence"]


@dataclass
class Block:
    """One structural element of a document, after cleaning."""

    text: str
    kind: BlockKind = "text"
    page: int | None = None
    depth: int = 0
    """Heading depth for titles (0 = top)."""
    table: Table | None = None
    """A table block's header and body rows (ingest/tables.py); the chunker makes row-wise units
    that repeat the column names. None for other blocks (and tables known only as text)."""


@dataclass
class ParsedDocument:
    path: str
    source: str
    doc_id: str
    content_hash: str
    blocks: list[Block]
    title: str = ""
    size: int = 0
    warnings: list[str] = field(default_factory=list)
    """What the readers could not read but did not fail the file for (scanned pages with OCR off,
    attachments not read), reported per file by the ingest."""

    @property
    def text(self) -> str:
        return "\n\n".join(b.text for b in self.blocks)


@dataclass
class Unit:
    """The smallest piece the chunker moves: a sentence, or a whole table/code/list item."""

    text: str
    title_path: tuple[str, ...] = ()
    page: int | None = None
    atomic: bool = False
    section: int = 0
    """Index of the titled section the unit lies in; a new section is a hard chunk boundary."""


@dataclass
class Chunk:
    text: str
    ord: int
    title_path: tuple[str, ...] = ()
    page: int | None = None
    sentences: list[str] = field(default_factory=list)


@dataclass
class KeyInfo:
    """Key information of one article, segment or sentence, and the raw text it maps to."""

    level: Level
    key_text: str
    raw_text: str
    chunk_ord: int | None
    ord: int
    title_path: tuple[str, ...] = ()
    keywords: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)
    summary: str = ""
