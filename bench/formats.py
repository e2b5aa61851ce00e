"""Parse time per format read through a converter (ingest/convert.py), on files made here.

    .venv/bin/python -m bench.formats [--repeats 3]

Makes one small file of each format with Chinese and English text: DOCX/XLSX/PPTX with
python-docx/openpyxl/python-pptx, DOC/XLS/PPT/ODS/ODP converted from them by LibreOffice, ODT and
EPUB written by pandoc from Markdown, a GBK RTF (as Chinese Word writes it), an EML with
attachments (standard library) and an Outlook MSG (the small compound-file writer below). Each
file is parsed `--repeats` times in-process (`parse_file`, no sandbox) and the median seconds per
file is recorded with the engine and the Debian/PyPI package it needs, the tool versions, the load
average (a busy machine slows LibreOffice's start most) and the resolved parse configuration.

Writes bench/results/formats.json. The file builders are also used by tests/test_formats.py.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import struct
import subprocess
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

DOCX_TEXT = "旧格式的年假规定：员工每年十五天 annual leave for legacy memos"
XLSX_ROW = ["苹果 apple", "华东", "5"]
PPTX_TEXT = "销售额增长 sales grew twelve percent"
ODT_MD = "# 开放文档 Handbook\n\n开放文档的正文 OpenDocument body.\n\n| 城市 | 人口 |\n|---|---|\n| 上海 | 2400 |\n"
EPUB_MD = "# 第一章 Chapter One\n\n电子书的中文内容 the ebook text.\n"

ENGINES = {
    ".doc": ("LibreOffice → DOCX → unstructured", "libreoffice-writer-nogui"),
    ".xls": ("LibreOffice → XLSX → table rows", "libreoffice-calc-nogui"),
    ".ppt": ("LibreOffice → PPTX → unstructured", "libreoffice-impress-nogui"),
    ".odt": ("LibreOffice → DOCX → unstructured", "libreoffice-writer-nogui"),
    ".ods": ("LibreOffice → XLSX → table rows", "libreoffice-calc-nogui"),
    ".odp": ("LibreOffice → PPTX → unstructured", "libreoffice-impress-nogui"),
    ".rtf": ("LibreOffice → DOCX → unstructured", "libreoffice-writer-nogui"),
    ".epub": ("pandoc → HTML → unstructured", "pandoc"),
    ".eml": ("stdlib email + unstructured; attachments parsed recursively", "(none)"),
    ".msg": ("python-oxmsg + unstructured; attachments parsed recursively", "PyPI python-oxmsg (MIT)"),
}
"""Extension -> (how it is read, what it needs installed), for the README's formats table."""


# -- files with known text ------------------------------------------------------------------------

def write_docx(path: Path, title: str, text: str) -> Path:
    import docx

    d = docx.Document()
    d.add_heading(title, 1)
    d.add_paragraph(text)
    d.save(str(path))
    return path


def office_sources(folder: Path) -> dict[str, Path]:
    """DOCX, XLSX and PPTX files holding DOCX_TEXT, a header and XLSX_ROW, and PPTX_TEXT."""
    import openpyxl
    from pptx import Presentation

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["产品", "地区", "价格"])
    ws.append(XLSX_ROW)
    wb.save(str(folder / "prices.xlsx"))
    prs = Presentation()
    slide = prs.slides.add_slide(prs.slide_layouts[1])
    slide.shapes.title.text = "季度汇报 Quarterly review"
    slide.placeholders[1].text = PPTX_TEXT
    prs.save(str(folder / "review.pptx"))
    return {"docx": write_docx(folder / "memo.docx", "遗留文档 Legacy memo", DOCX_TEXT),
            "xlsx": folder / "prices.xlsx", "pptx": folder / "review.pptx"}


def soffice_all(jobs: list[tuple[Path, str]], out: Path) -> None:
    """Convert (file, target extension) pairs with LibreOffice, side by side, each with its own
    profile (the profile is what keeps parallel conversions apart)."""
    procs = []
    for i, (src, target) in enumerate(jobs):
        prof = (out / f".profile{i}").as_uri()
        procs.append(subprocess.Popen(["soffice", "--headless", f"-env:UserInstallation={prof}",
                                       "--convert-to", target, "--outdir", str(out), str(src)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait(300)


def gbk_rtf(zh: str, en: str) -> bytes:
    """RTF as Chinese Word/WordPad write it: GBK bytes as \\'xx escapes under \\ansicpg936."""
    esc = b"".join(b"\\'" + f"{c:02x}".encode() for c in zh.encode("gbk"))
    return (b"{\\rtf1\\ansi\\ansicpg936\\deff0{\\fonttbl{\\f0\\fnil\\fcharset134 SimSun;}}\\f0 "
            + esc + b" " + en.encode() + b"\\par}")


def make_formats(out: Path) -> dict[str, Path]:
    """One file per converted format (and the DOCX it started from) in `out`, by extension."""
    src = out / ".sources"
    src.mkdir(parents=True, exist_ok=True)
    s = office_sources(src)
    soffice_all([(s["docx"], "doc"), (s["xlsx"], "xls"), (s["pptx"], "ppt"), (s["xlsx"], "ods"),
                 (s["pptx"], "odp")], out)
    (src / "odt.md").write_text(ODT_MD, encoding="utf-8")
    (src / "epub.md").write_text(EPUB_MD, encoding="utf-8")
    subprocess.run(["pandoc", str(src / "odt.md"), "-o", str(out / "handbook.odt")], check=True)
    subprocess.run(["pandoc", str(src / "epub.md"), "--metadata", "title=电子书", "-o",
                    str(out / "book.epub")], check=True)
    (out / "gbk.rtf").write_bytes(gbk_rtf("富文本中文", "rich text"))
    files = {p.suffix: p for p in out.iterdir() if p.is_file()}
    files[".docx"] = s["docx"]
    return files


def email_with_attachments(docx: Path) -> bytes:
    """An EML: a body, a DOCX attachment, a broken PDF and a forwarded message with a CSV."""
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = "报销流程 Expense claims", "hr@example.com", "all@example.com"
    msg.set_content("报销需要在三十天内提交。 Claims are due within 30 days.")
    msg.add_attachment(docx.read_bytes(), maintype="application",
                       subtype="vnd.openxmlformats-officedocument.wordprocessingml.document",
                       filename="附件说明.docx")
    msg.add_attachment(b"%PDF-1.4\n" + b"\x00garbage" * 20, maintype="application", subtype="pdf",
                       filename="broken.pdf")
    inner = EmailMessage()
    inner["Subject"] = "转发 Forwarded"
    inner.set_content("内层邮件正文说明了转发的原因。 The inner message explains why it was forwarded.")
    inner.add_attachment("城市,人口\n上海,2400\n".encode(), maintype="text", subtype="csv", filename="cities.csv")
    msg.add_attachment(inner)
    return msg.as_bytes()


# -- a minimal OLE compound file (MS-CFB version 3) writer, for Outlook .msg files -----------------

_END, _FREE, _FATSECT, _NOSTREAM = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF
_DIR = struct.Struct("<64sHBBIII16sIQQIQ")


def _dir_entry(e: dict | None) -> bytes:
    if e is None:
        return _DIR.pack(b"", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM, b"\0" * 16, 0, 0, 0, 0, 0)
    name = e["name"].encode("utf-16-le") + b"\0\0"
    return _DIR.pack(name, len(name), e["type"], 1, e["left"], e["right"], e["child"], b"\0" * 16,
                     0, 0, 0, e["start"], len(e["data"]))


def _entries(tree: dict) -> list[dict]:
    """Directory entries of `tree` (root first), children as balanced binary trees by CFB order."""
    entries = [{"name": "Root Entry", "type": 5, "data": b"", "kids": []}]

    def add(node: dict, parent: int) -> None:
        for name, val in node.items():
            entries.append({"name": name, "type": 1 if isinstance(val, dict) else 2,
                            "data": b"" if isinstance(val, dict) else val, "kids": []})
            entries[parent]["kids"].append(len(entries) - 1)
            if isinstance(val, dict):
                add(val, len(entries) - 1)

    def balance(idx: list[int]) -> int:
        if not idx:
            return _NOSTREAM
        mid = len(idx) // 2
        entries[idx[mid]]["left"], entries[idx[mid]]["right"] = balance(idx[:mid]), balance(idx[mid + 1:])
        return idx[mid]

    add(tree, 0)
    for e in entries:
        e.setdefault("left", _NOSTREAM)
        e.setdefault("right", _NOSTREAM)
    for e in entries:
        e["child"] = balance(sorted(e["kids"], key=lambda i: (len(entries[i]["name"]), entries[i]["name"].upper())))
    return entries


def cfb(tree: dict) -> bytes:
    """A compound file holding `tree`: name -> bytes (a stream) or dict (a storage). Streams under
    4096 bytes go to the mini stream, as the format requires."""
    entries = _entries(tree)
    sectors: list[bytes] = []
    fat: list[int] = []

    def alloc(data: bytes) -> int:
        start, n = len(sectors), math.ceil(len(data) / 512)
        for k in range(n):
            sectors.append(data[k * 512:(k + 1) * 512].ljust(512, b"\0"))
            fat.append(start + k + 1 if k < n - 1 else _END)
        return start

    mini, minifat = bytearray(), []
    for e in entries[1:]:
        d, e["start"] = e["data"], _END if e["type"] == 2 else 0
        if len(d) >= 4096:
            e["start"] = alloc(d)
        elif d:
            n, e["start"] = math.ceil(len(d) / 64), len(minifat)
            minifat += [e["start"] + k + 1 if k < n - 1 else _END for k in range(n)]
            mini += d.ljust(n * 64, b"\0")
    entries[0]["start"], entries[0]["data"] = (alloc(bytes(mini)) if mini else _END), bytes(mini)
    mf = b"".join(struct.pack("<I", x) for x in minifat)
    mf_start = alloc(mf + b"\xff" * (-len(mf) % 512)) if minifat else _END
    dirs = b"".join(_dir_entry(e) for e in entries) + _dir_entry(None) * (-len(entries) % 4)
    dir_start = alloc(dirs)
    n_fat = 1
    while len(fat) + n_fat > 128 * n_fat:
        n_fat += 1
    fat_ids = list(range(len(sectors), len(sectors) + n_fat))
    fat += [_FATSECT] * n_fat
    fat += [_FREE] * (128 * n_fat - len(fat))
    fat_bytes = b"".join(struct.pack("<I", x) for x in fat)
    sectors += [fat_bytes[k * 512:(k + 1) * 512] for k in range(n_fat)]
    header = struct.pack("<8s16s5H6s9I", bytes.fromhex("d0cf11e0a1b11ae1"), b"\0" * 16, 0x3E, 3, 0xFFFE,
                         9, 6, b"\0" * 6, 0, n_fat, dir_start, 0, 4096, mf_start,
                         math.ceil(len(mf) / 512), _END, 0)
    header += struct.pack("<109I", *(fat_ids + [_FREE] * (109 - n_fat)))
    return header + b"".join(sectors)


def _props(header: bytes, items: list[tuple[int, int, object]]) -> dict:
    """A MSG property stream and the streams of its variable-length values (MS-OXMSG 2.4)."""
    streams, stream = {}, bytearray(header)
    for pid, ptype, val in items:
        if ptype == 0x001F:  # PtypString, UTF-16LE
            data = str(val).encode("utf-16-le")
            streams[f"__substg1.0_{pid:04X}{ptype:04X}"] = data
            fixed = struct.pack("<II", len(data) + 2, 0)
        elif ptype == 0x0102:  # PtypBinary
            streams[f"__substg1.0_{pid:04X}{ptype:04X}"] = val
            fixed = struct.pack("<II", len(val), 0)
        else:  # PtypInteger32
            fixed = struct.pack("<iI", val, 0)
        stream += struct.pack("<II", (pid << 16) | ptype, 6) + fixed
    streams["__properties_version1.0"] = bytes(stream)
    return streams


def outlook_msg(subject: str, body: str, attachments: list[tuple[str, bytes | None]]) -> bytes:
    """An Outlook .msg: subject, plain-text body, attachments by value (None: no data)."""
    n = len(attachments)
    root = _props(struct.pack("<8x4I8x", 0, n, 0, n),
                  [(0x001A, 0x001F, "IPM.Note"), (0x0037, 0x001F, subject), (0x1000, 0x001F, body)])
    for i, (name, data) in enumerate(attachments):
        items = [(0x3705, 0x0003, 1), (0x3704, 0x001F, name), (0x3707, 0x001F, name)]
        if data is not None:
            items.append((0x3701, 0x0102, data))
        root[f"__attach_version1.0_#{i:08X}"] = _props(b"\0" * 8, items)
    return cfb(root)


# -- the benchmark --------------------------------------------------------------------------------

def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "absent"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from bench.common import table, write_result
    from ingest.loaders import ZipLimits, ocr_options, parse_file, point_unstructured_at_packaged_spacy_model
    from kb.settings import load_settings

    settings = load_settings(None)
    p = settings.parse
    point_unstructured_at_packaged_spacy_model()
    with tempfile.TemporaryDirectory() as tmp:
        files = make_formats(Path(tmp))
        files[".eml"] = Path(tmp) / "mail.eml"
        files[".eml"].write_bytes(email_with_attachments(files[".docx"]))
        files[".msg"] = Path(tmp) / "minutes.msg"
        files[".msg"].write_bytes(outlook_msg("会议纪要 Minutes", "预算已批准 the budget was approved.",
                                              [("议程.docx", files[".docx"].read_bytes())]))
        parse_file(files[".docx"])  # load the parsers before timing
        rows = []
        for ext, (engine, needs) in ENGINES.items():
            times, load = [], []
            for _ in range(args.repeats):
                load.append(round(os.getloadavg()[0], 2))
                t0 = time.perf_counter()
                blocks = parse_file(files[ext], p.max_file_mb, p.pdf_strategy, p.languages,
                                    ZipLimits(p.max_unzipped_mb, p.max_zip_ratio), p.max_line_chars, ocr_options(p))
                times.append(time.perf_counter() - t0)
            rows.append({"format": ext, "engine": engine, "needs": needs, "bytes": files[ext].stat().st_size,
                         "blocks": len(blocks), "median_s": round(statistics.median(times), 3),
                         "runs_s": [round(t, 3) for t in times], "loadavg_1m": load})
    out = write_result("formats", {
        "rows": rows, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "tools": {"pandoc": _version(["pandoc", "--version"]), "soffice": _version(["soffice", "--version"])},
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "config": {"parse": p.model_dump()},
    })
    print(table(rows, ["format", "engine", "needs", "median_s", "loadavg_1m"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
