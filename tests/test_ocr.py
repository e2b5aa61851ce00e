"""OCR of images and scanned PDF pages (ingest/ocr.py), on pages rendered here with a Debian CJK font."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from bench.ocr import cer, render_page, scan_like
from ingest import ocr
from ingest.loaders import ParseError, parse_document, parse_file
from ingest.ocr import OcrOptions
from kb.settings import CleanConfig, ParseConfig

FONTS = [Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
         Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")]
FONT = next((f for f in FONTS if f.is_file()), None)
pytestmark = [
    pytest.mark.skipif(FONT is None, reason="no CJK font (apt install fonts-wqy-microhei or fonts-noto-cjk)"),
    pytest.mark.skipif(shutil.which("tesseract") is None,
                       reason="tesseract is not installed (apt install tesseract-ocr tesseract-ocr-chi-sim)"),
]
SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "docs"
# from CMRC 2018 (CC BY-SA 4.0) and unstructured's norwich-city.txt (Apache-2.0)
ZH = ("基于《跑跑卡丁车》与《泡泡堂》上所开发的游戏，由韩国Nexon开发与发行。中国大陆由盛大游戏运营，"
      "这是Nexon时隔6年再次授予盛大网络其游戏运营权。台湾由游戏橘子运营。")
EN = "Iwan Wyn Roberts is a Welsh former professional footballer who played as a forward from 1986 to 2005."
TESSERACT = OcrOptions("tesseract", ("chi_sim", "eng"), 150)
"""Scanned PDF pages rendered at 150 dpi: the test pages are scanned at 150 dpi (and it is fast)."""


def page(paragraphs: list[str], dpi: int = 150):
    """A small white page with `paragraphs` in the CJK font (12 pt at `dpi`)."""
    return render_page(paragraphs, FONT, dpi=dpi)


def text_of(blocks) -> str:
    return "\n".join(b.text for b in blocks)


def scanned_pdf(path: Path, paragraphs: list[str]) -> Path:
    """An image-only PDF (no text layer) of a scan-like page of `paragraphs`."""
    scan_like(page(paragraphs, dpi=300), seed=1).convert("RGB").save(path, "PDF", resolution=150)
    return path


def test_png_with_chinese_and_english_is_read_in_order_without_spaces_between_hanzi(tmp_path):
    path = tmp_path / "notice.png"
    page([ZH, EN]).save(path)
    blocks = parse_file(path, ocr=TESSERACT)
    text = text_of(blocks)
    assert cer(text, ZH + "\n" + EN) <= 0.05, text
    assert "盛大网络" in text and "盛大游戏运营" in text and "footballer" in text
    assert text.index("跑跑") < text.index("footballer")
    assert len(blocks) == 2 and all(b.page == 1 for b in blocks)


def test_rapidocr_engine_reads_chinese_offline(tmp_path, monkeypatch):
    pytest.importorskip("rapidocr_onnxruntime", reason="pip install rapidocr-onnxruntime==1.4.4")
    import socket

    def no_network(*_a, **_k):
        raise AssertionError("rapidocr tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = tmp_path / "zh.png"
    page([ZH]).save(path)
    text = text_of(parse_file(path, ocr=OcrOptions("rapidocr")))
    assert cer(text, ZH) <= 0.05, text
    assert "盛大网络" in text


def test_multipage_tiff_and_a_jpeg_named_png(tmp_path):
    tiff = tmp_path / "scan.tiff"
    first, second = scan_like(page([ZH], dpi=300), seed=2), scan_like(page([EN], dpi=300), seed=3)
    first.save(tiff, save_all=True, append_images=[second], dpi=(150, 150))
    blocks = parse_file(tiff, ocr=TESSERACT)
    by_page = {p: text_of(b for b in blocks if b.page == p) for p in {b.page for b in blocks}}
    assert set(by_page) == {1, 2}
    assert cer(by_page[1], ZH) <= 0.10 and "former professional footballer" in by_page[2]

    jpeg = tmp_path / "photo.png"  # JPEG content under an image extension: read as what it is
    page([EN]).save(jpeg, "JPEG", quality=90)
    assert "Welsh" in text_of(parse_file(jpeg, ocr=TESSERACT))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ParseError, match="cannot read the image"):
        parse_file(broken, ocr=TESSERACT)
    fake = tmp_path / "fake.pdf"
    page([EN]).save(fake, "PNG")
    with pytest.raises(ParseError, match=r"the file is a PNG image .*, not a PDF"):
        parse_file(fake, ocr=TESSERACT)


def test_ocr_off_or_missing_is_a_clear_per_file_error(tmp_path, monkeypatch):
    image = tmp_path / "scan.png"
    page([ZH]).save(image)
    pdf = scanned_pdf(tmp_path / "scan.pdf", [ZH])
    off = ParseConfig(ocr="off")
    with pytest.raises(ParseError, match=r"no text layer and OCR is off \(parse.ocr\)"):
        parse_document(image, "scan.png", "d1", "h", off, CleanConfig())
    with pytest.raises(ParseError,
                       match=r"the PDF has no text layer and OCR is off \(parse.ocr\) \(1 scanned page\(s\)\)"):
        parse_document(pdf, "scan.pdf", "d2", "h", off, CleanConfig())

    assert ocr.resolve("auto") == ocr.DEFAULT_ENGINE == "tesseract" and ocr.resolve("off") is None
    monkeypatch.setattr(ocr, "available", lambda name: name == "rapidocr")
    assert ocr.resolve("auto") == "rapidocr"
    monkeypatch.setattr(ocr, "available", lambda name: False)
    with pytest.raises(ParseError, match="OCR is not installed .apt install tesseract-ocr tesseract-ocr-chi-sim.*"
                                         "pip install rapidocr-onnxruntime"):
        parse_document(image, "scan.png", "d1", "h", ParseConfig(ocr="auto"), CleanConfig())
    ocr.get_engine.cache_clear()
    monkeypatch.setattr(ocr.shutil, "which", lambda name: None)
    try:
        with pytest.raises(ParseError, match="tesseract is not installed .Debian: apt install tesseract-ocr"):
            parse_document(image, "scan.png", "d1", "h", ParseConfig(ocr="tesseract"), CleanConfig())
    finally:
        ocr.get_engine.cache_clear()


def test_configured_languages_and_dpi_reach_the_engine(tmp_path, monkeypatch):
    pdf = scanned_pdf(tmp_path / "scan.pdf", [ZH])
    with pytest.raises(ParseError, match="no language data for klingon .*apt install tesseract-ocr-klingon"):
        parse_document(pdf, "scan.pdf", "d", "h", ParseConfig(ocr="tesseract", ocr_languages=["chi_sim", "klingon"]),
                       CleanConfig())
    seen = []
    render = ocr.render_pages

    def spy(path, pages, dpi):
        seen.append((pages, dpi))
        return render(path, pages, dpi)

    monkeypatch.setattr(ocr, "render_pages", spy)
    doc = parse_document(pdf, "scan.pdf", "d", "h", ParseConfig(ocr="tesseract", ocr_dpi=160), CleanConfig())
    assert seen == [([1], 160)]
    assert cer(doc.text, ZH) <= 0.10 and doc.blocks[0].page == 1


def test_mixed_pdf_ocrs_the_scanned_page_or_keeps_the_text_pages_with_a_warning(tmp_path, caplog):
    from pypdf import PdfWriter

    scan = scanned_pdf(tmp_path / "scan.pdf", [ZH])
    mixed = tmp_path / "mixed.pdf"
    writer = PdfWriter()
    writer.append(str(SAMPLES / "fake-memo.pdf"))
    writer.append(str(scan))
    writer.write(str(mixed))
    blocks = parse_file(mixed, ocr=TESSERACT)
    memo = [b for b in blocks if b.page == 1]
    scanned = [b for b in blocks if b.page == 2]
    assert any("bottles" in b.text for b in memo) and cer(text_of(scanned), ZH) <= 0.10
    assert blocks.index(memo[-1]) < blocks.index(scanned[0])

    with caplog.at_level(logging.WARNING, logger="ingest.ocr"):
        kept = parse_file(mixed, ocr=OcrOptions("off"))
    assert [b.text for b in kept] == [b.text for b in memo]
    assert "mixed.pdf: page(s) 2 have no text layer and were skipped: OCR is off (parse.ocr)" in caplog.text


def test_scanned_chinese_pdf_is_found_by_kb_search(settings, tmp_path, tiny_nsp_dir, monkeypatch, capsys):
    from cli import main

    monkeypatch.setenv("KB_MODELS__NSP", str(tiny_nsp_dir))
    monkeypatch.setenv("KB_PARSE__OCR_DPI", "150")
    pdf = scanned_pdf(tmp_path / "扫描件.pdf", [ZH])
    assert main(["ingest", str(pdf), "--kb", "scans", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["ingested"] == 1
    assert main(["search", "盛大网络的游戏运营权", "--kb", "scans", "-k", "1", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["source"] == "扫描件.pdf" and "盛大网络" in hits[0]["text"]

    monkeypatch.setenv("KB_PARSE__OCR", "off")
    monkeypatch.setenv("KB_PARSE__ISOLATE", "false")  # the worker path ran above; in-process is quicker
    other = scanned_pdf(tmp_path / "other.pdf", [EN])
    assert main(["ingest", str(other), "--kb", "scans", "--json", "-q"]) == 2
    failed = json.loads(capsys.readouterr().out)["failed"]
    assert "has no text layer and OCR is off (parse.ocr)" in failed[0]["error"]


def test_pages_skipped_without_ocr_are_in_the_ingest_report(settings, tmp_path, monkeypatch):
    """What a file lost without failing (a scanned page with OCR off) is reported beside it, from
    the sandboxed worker too, not only logged."""
    from pypdf import PdfWriter

    from ingest.pipeline import ingest, items_from_paths

    writer = PdfWriter()
    writer.append(str(SAMPLES / "fake-memo.pdf"))
    writer.append(str(scanned_pdf(tmp_path / "scan.pdf", [EN])))
    folder = tmp_path / "in"
    folder.mkdir()
    writer.write(str(folder / "mixed.pdf"))
    settings.parse.ocr = "off"
    assert settings.parse.isolate
    items, _ = items_from_paths([folder])
    report = ingest(items, "mixed", settings, progress=False)
    assert report.ingested == 1 and not report.failed
    assert report.warnings == [{"path": str(folder / "mixed.pdf"), "warning":
                                "mixed.pdf: page(s) 2 have no text layer and were skipped: OCR is off (parse.ocr)"}]
