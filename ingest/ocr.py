"""Optical character recognition of images and of PDF pages without a text layer, offline.

Two engines behind one interface (`OcrEngine.recognise(image) -> list of paragraphs`):

- `tesseract`: Debian's `tesseract-ocr` (5.x) binary with the language packs named in
  `parse.ocr_languages` (`tesseract-ocr-chi-sim`, `-chi-tra`, `-eng`); run as a subprocess, its TSV
  output (blocks, paragraphs, lines, words) joined into paragraphs, with the spaces it puts between
  Chinese characters removed.
- `rapidocr`: PyPI `rapidocr-onnxruntime` (PP-OCRv4 Chinese+English detection and recognition in
  ONNX, the models inside the wheel; nothing is downloaded). Its text lines are grouped into
  paragraphs by their layout (vertical gaps, indents, short last lines).

Engines are created lazily, once per process (a parsing worker loads one on its first scanned file).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from ingest.types import Block

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

EngineName = Literal["tesseract", "rapidocr"]
DEFAULT_ENGINE: EngineName = "tesseract"
"""What `parse.ocr: auto` uses when installed (else the other engine); chosen by bench/ocr.py."""

IMAGE_TYPES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".webp"}
"""Extensions of image files parsed by OCR."""

INSTALL_HINT = {
    "tesseract": "apt install tesseract-ocr tesseract-ocr-chi-sim tesseract-ocr-chi-tra",
    "rapidocr": "pip install rapidocr-onnxruntime==1.4.4",
}
MIN_TEXT_CHARS = 5
"""A PDF page with fewer non-blank characters in its text layer counts as scanned (no text layer)."""

_CJK = r"\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_GAP = re.compile(rf"(?<=[{_CJK}])[ \t]+(?=[{_CJK}])")
_CJK_CHAR = re.compile(rf"[{_CJK}]")


class OcrError(Exception):
    """OCR cannot run or read the input; the message says what to install or fix."""


@dataclass(frozen=True)
class OcrOptions:
    """What `parse.ocr*` asks for, in a picklable form for the parsing worker."""

    engine: Literal["auto", "tesseract", "rapidocr", "off"] = "auto"
    languages: tuple[str, ...] = ("chi_sim", "eng")
    dpi: int = 300


class OcrEngine(Protocol):
    """An OCR engine: paragraphs of an image in reading order."""

    name: str

    def recognise(self, image: Image.Image) -> list[str]:
        """The paragraphs of `image` in reading order (lines of a paragraph joined)."""
        ...


def join_cjk(text: str) -> str:
    """`text` without the spaces between two CJK characters (or CJK punctuation)."""
    return _CJK_GAP.sub("", text)


def join_line(left: str, right: str) -> str:
    """Two pieces of one paragraph joined: directly between CJK characters, else with a space."""
    if not left:
        return right
    if not right:
        return left
    if _CJK_CHAR.match(right[0]) or _CJK_CHAR.match(left[-1]):
        return left + right
    if left.endswith("-") and left[-2:-1].isalpha() and right[:1].islower():
        return left[:-1] + right  # a word hyphenated at the line end
    return left + " " + right


class TesseractEngine:
    """The `tesseract` binary (Debian `tesseract-ocr`), one subprocess per image."""

    name = "tesseract"

    def __init__(self, languages: tuple[str, ...], dpi: int = 300) -> None:
        exe = shutil.which("tesseract")
        if exe is None:
            raise OcrError("OCR engine tesseract is not installed (Debian: "
                           f"{INSTALL_HINT['tesseract']})")
        missing = [lang for lang in languages if lang not in tesseract_languages(exe)]
        if missing:
            pkgs = " ".join("tesseract-ocr-" + lang.replace("_", "-") for lang in missing)
            raise OcrError(f"tesseract has no language data for {', '.join(missing)} "
                           f"(parse.ocr_languages); install it: apt install {pkgs}")
        self.exe, self.languages, self.dpi = exe, languages, dpi

    def recognise(self, image: Image.Image) -> list[str]:
        """Paragraphs of `image`. With CJK and other language packs configured, the CJK packs read
        first (mixed with Latin ones they turn some Chinese lines into Latin garbage) and, when
        the page comes out mostly Latin, all packs read it again (CJK packs lose English spaces)."""
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        png = buf.getvalue()
        cjk = tuple(lang for lang in self.languages if lang.split("_")[0] in CJK_PACKS)
        if not cjk or len(cjk) == len(self.languages):
            return self.run(png, self.languages)
        paragraphs = self.run(png, cjk)
        if cjk_share("".join(paragraphs)) < 0.3:
            paragraphs = self.run(png, self.languages)
        return paragraphs

    def run(self, png: bytes, languages: tuple[str, ...]) -> list[str]:
        """Paragraphs of the PNG image `png` from tesseract's TSV output (automatic page segmentation)."""
        cmd = [self.exe, "stdin", "stdout", "-l", "+".join(languages), "--psm", "3",
               "--dpi", str(self.dpi), "tsv"]
        env = {**os.environ, "OMP_THREAD_LIMIT": os.environ.get("OMP_THREAD_LIMIT", "1")}
        proc = subprocess.run(cmd, input=png, capture_output=True, env=env, check=False)
        if proc.returncode != 0:
            raise OcrError(f"tesseract failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[-300:]}")
        return tsv_paragraphs(proc.stdout.decode("utf-8", "replace"))


CJK_PACKS = {"chi", "jpn", "kor"}
"""Tesseract language packs (by the part before "_": chi_sim, chi_tra, jpn_vert, ...) for CJK scripts."""


def cjk_share(text: str) -> float:
    """CJK characters among the CJK characters and Latin letters of `text` (1.0 when it has neither)."""
    cjk = len(_CJK_CHAR.findall(text))
    latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return cjk / (cjk + latin) if cjk + latin else 1.0


@cache
def tesseract_languages(exe: str) -> frozenset[str]:
    """The language packs `tesseract --list-langs` reports."""
    out = subprocess.run([exe, "--list-langs"], capture_output=True, text=True, check=False).stdout
    return frozenset(ln.strip() for ln in out.splitlines()[1:] if ln.strip())


def tsv_paragraphs(tsv: str) -> list[str]:
    """Paragraphs from tesseract's TSV: words joined into lines, the lines of each block grouped
    by their layout (`layout_paragraphs`; tesseract's own paragraphs split Chinese text at random)."""
    words: dict[tuple[int, int, int], list[tuple[str, int, int, int, int]]] = {}
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        word = (row.get("text") or "").strip()
        if row.get("level") != "5" or not word:
            continue
        x, y, w, h = (int(row[k]) for k in ("left", "top", "width", "height"))
        words.setdefault((int(row["block_num"]), int(row["par_num"]), int(row["line_num"])), []).append(
            (word, x, y, x + w, y + h))
    blocks: dict[int, list[_Line]] = {}
    for (block, _, _), ws in words.items():
        text = ""
        for w in ws:
            text = join_line(text, w[0])
        blocks.setdefault(block, []).append(_Line(text, min(w[1] for w in ws), min(w[2] for w in ws),
                                                  max(w[3] for w in ws), max(w[4] for w in ws)))
    return [p for lines in blocks.values() for p in layout_paragraphs(lines)]


@dataclass
class _Line:
    text: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def height(self) -> float:
        return max(self.y1 - self.y0, 1.0)


class RapidOcrEngine:
    """PyPI `rapidocr-onnxruntime` (PP-OCRv4, models inside the wheel), loaded once."""

    name = "rapidocr"

    def __init__(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise OcrError("OCR engine rapidocr is not installed "
                           f"({INSTALL_HINT['rapidocr']}): {e}") from e
        self.ocr = RapidOCR()

    def recognise(self, image: Image.Image) -> list[str]:
        """Paragraphs of `image`: detected lines grouped by layout."""
        result, _ = self.ocr(image.convert("RGB"))
        lines = []
        for box, text, _score in result or []:
            xs, ys = [p[0] for p in box], [p[1] for p in box]
            if text.strip():
                lines.append(_Line(text.strip(), min(xs), min(ys), max(xs), max(ys)))
        return layout_paragraphs(lines)


def _rows(lines: list[_Line]) -> list[_Line]:
    """Lines merged left to right where they share a row (boxes overlapping vertically by half)."""
    rows: list[_Line] = []
    for ln in sorted(lines, key=lambda b: (b.y0 + b.y1) / 2):
        last = rows[-1] if rows else None
        overlap = min(last.y1, ln.y1) - max(last.y0, ln.y0) if last else 0.0
        if last and overlap > 0.5 * min(last.height, ln.height):
            left, right = (last, ln) if last.x0 <= ln.x0 else (ln, last)
            rows[-1] = _Line(join_line(left.text, right.text), min(last.x0, ln.x0), min(last.y0, ln.y0),
                             max(last.x1, ln.x1), max(last.y1, ln.y1))
        else:
            rows.append(ln)
    return rows


def room_needed(prev: _Line, row: _Line) -> float:
    """Width the first word of `row` (one character for CJK text) and a space take in `prev`'s
    average character width."""
    first = row.text[:1] if _CJK_CHAR.match(row.text[:1]) else (row.text.split() or [""])[0]
    char_w = (prev.x1 - prev.x0) / max(len(prev.text), 1)
    return (len(first) + 1) * char_w


def layout_paragraphs(lines: list[_Line]) -> list[str]:
    """Rows of text grouped into paragraphs: a new one after a gap clearly wider than the usual
    gap between lines, at an indented row (Chinese paragraphs start two characters in) or after a
    row ending so short of the right margin that the next row's first word would have fit."""
    rows = _rows(lines)
    if not rows:
        return []
    left = min(r.x0 for r in rows)
    right = max(r.x1 for r in rows)
    gaps = sorted(max(b.y0 - a.y1, 0.0) for a, b in zip(rows, rows[1:]))
    usual = gaps[len(gaps) // 2] if gaps else 0.0
    paragraphs: list[str] = []
    text, prev = "", None
    for row in rows:
        h = row.height
        new = prev is None or (
            row.y0 - prev.y1 > usual + 0.6 * h
            or row.x0 - left > 1.2 * h
            or right - prev.x1 > room_needed(prev, row) + 0.5 * h
        )
        if new and text:
            paragraphs.append(join_cjk(text).strip())
            text = ""
        text = join_line(text, row.text)
        prev = row
    if text:
        paragraphs.append(join_cjk(text).strip())
    return [p for p in paragraphs if p]


def available(name: EngineName) -> bool:
    """Whether engine `name` can run here (binary or package present), without loading it."""
    if name == "tesseract":
        return shutil.which("tesseract") is not None
    import importlib.util

    return importlib.util.find_spec("rapidocr_onnxruntime") is not None


def resolve(choice: str) -> EngineName | None:
    """The engine `parse.ocr` = `choice` means here: auto = the default if installed, else the
    other, else None (off); an explicit engine is returned as is (its absence is an error later)."""
    if choice == "off":
        return None
    if choice != "auto":
        return choice  # type: ignore[return-value]
    other: EngineName = "rapidocr" if DEFAULT_ENGINE == "tesseract" else "tesseract"
    return next((n for n in (DEFAULT_ENGINE, other) if available(n)), None)


@cache
def get_engine(name: EngineName, languages: tuple[str, ...] = ("chi_sim", "eng"), dpi: int = 300) -> OcrEngine:
    """The engine `name`, created on first use and kept for this process."""
    if name == "tesseract":
        return TesseractEngine(languages, dpi)
    if name == "rapidocr":
        return RapidOcrEngine()
    raise OcrError(f"unknown OCR engine {name!r} (parse.ocr: auto, tesseract, rapidocr or off)")


def off_reason(opts: OcrOptions) -> str:
    """Why OCR does not run under `opts`: off in the config, or no engine installed."""
    if opts.engine == "off":
        return "OCR is off (parse.ocr)"
    return ("OCR is not installed (" + INSTALL_HINT["tesseract"] + " or "
            + INSTALL_HINT["rapidocr"] + ")")


def engine_for(opts: OcrOptions) -> OcrEngine | None:
    """The engine `opts` selects, loaded once per process; None when OCR is off or none is installed."""
    name = resolve(opts.engine)
    if name is None:
        if opts.engine == "auto":
            log.warning("no OCR engine installed: scanned pages and images cannot be read (%s)",
                        off_reason(opts))
        return None
    return get_engine(name, tuple(opts.languages), opts.dpi)


def prepare(image: Image.Image) -> Image.Image:
    """`image` upright (EXIF orientation), in RGB or greyscale, for an engine."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    return image if image.mode in {"RGB", "L"} else image.convert("RGB")


def image_pages(path: Path) -> Iterator[Image.Image]:
    """The pages (frames) of an image file: one for most, several for a multi-page TIFF."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if path.suffix.lower() in {".heic", ".heif"}:
        register_heif()
    try:
        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                yield prepare(frame.copy())
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise OcrError(f"cannot read the image: {type(e).__name__}: {str(e)[:200]}") from e


def register_heif() -> None:
    """Let Pillow open HEIC/HEIF (pi_heif); an OcrError naming the package when it is missing."""
    try:
        import pi_heif
    except ImportError as e:
        raise OcrError("HEIC images need the PyPI package pi-heif (pip install pi-heif)") from e
    pi_heif.register_heif_opener()


def image_blocks(path: Path, opts: OcrOptions) -> list[Block]:
    """The text blocks of an image file (each page of a multi-page TIFF numbered), by OCR."""
    engine = engine_for(opts)
    if engine is None:
        raise OcrError(f"an image has no text layer and {off_reason(opts)}")
    blocks: list[Block] = []
    pages = 0
    for number, image in enumerate(image_pages(path), start=1):
        pages += 1
        blocks.extend(Block(text=t, kind="text", page=number) for t in engine.recognise(image))
    if not blocks:
        raise OcrError(f"no text found by OCR ({engine.name}) in the image ({pages} page(s))")
    return blocks


def scanned_pages(path: Path) -> list[int]:
    """1-based numbers of the PDF's pages whose text layer has fewer than MIN_TEXT_CHARS characters."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    try:
        found = []
        for i in range(len(pdf)):
            page = pdf[i]
            textpage = page.get_textpage()
            chars = len("".join(textpage.get_text_range().split()))
            textpage.close()
            page.close()
            if chars < MIN_TEXT_CHARS:
                found.append(i + 1)
        return found
    finally:
        pdf.close()


def render_pages(path: Path, pages: list[int], dpi: int) -> Iterator[tuple[int, Image.Image]]:
    """(page number, image) of the given 1-based PDF pages rendered at `dpi`."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    try:
        for number in pages:
            page = pdf[number - 1]
            yield number, page.render(scale=dpi / 72).to_pil().convert("RGB")
            page.close()
    finally:
        pdf.close()


def pdf_blocks(path: Path, blocks: list[Block], opts: OcrOptions) -> list[Block]:
    """A PDF's text-layer `blocks` with its scanned pages OCR'd in, in page order. With OCR off or
    missing: an OcrError when no page has text, else the text pages alone and a logged warning."""
    pages = scanned_pages(path)
    if not pages:
        return blocks
    engine = engine_for(opts)
    has_text = any(b.text.strip() for b in blocks)
    if engine is None:
        reason = off_reason(opts)
        if not has_text:
            raise OcrError(f"the PDF has no text layer and {reason} ({len(pages)} scanned page(s))")
        log.warning("%s: page(s) %s have no text layer and were skipped: %s", path.name,
                    ", ".join(map(str, pages)), reason)
        return blocks
    found: dict[int, list[Block]] = {}
    for number, image in render_pages(path, pages, opts.dpi):
        found[number] = [Block(text=t, kind="text", page=number) for t in engine.recognise(image)]
    if not has_text and not any(found.values()):
        raise OcrError(f"no text found: the PDF has no text layer and OCR ({engine.name}) found no "
                       f"text on its {len(pages)} page(s)")
    return merge_pages(blocks, found)


def merge_pages(blocks: list[Block], ocr: dict[int, list[Block]]) -> list[Block]:
    """`blocks` with each page's OCR blocks inserted before the first block of a later page."""
    out: list[Block] = []
    pending = sorted(ocr)
    for b in blocks:
        while pending and b.page is not None and pending[0] < b.page:
            out.extend(ocr[pending.pop(0)])
        out.append(b)
    for number in pending:
        out.extend(ocr[number])
    return out
