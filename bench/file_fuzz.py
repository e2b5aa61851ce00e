"""Fuzzed files through the ingestion pipeline: every bad file gets a clear reason, none crashes or
hangs the batch; and what parsing in a sandboxed worker costs against parsing in-process.

    .venv/bin/python -m bench.file_fuzz [--seeds 5] [--mutants 3]

Writes bench/results/file_fuzz.json: per kind the number of files, clear failures, successes,
crashes/hangs (a file whose reason is not one of the expected clear ones, or an exception that
escapes the batch) and the slowest file; the isolation overhead on samples/docs (files/s in a
sandboxed worker vs in-process); the resolved parse configuration.

The generators are also used by tests/test_fuzz_files.py (with smaller sizes).
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "docs"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"


def zip_bomb(out: Path, office: str, unpacked_mb: int) -> Path:
    """A DOCX/XLSX whose main part unpacks to `unpacked_mb` MiB of XML (about 1000:1)."""
    part = {"docx": "word/document.xml", "xlsx": "xl/workbook.xml", "pptx": "ppt/presentation.xml"}[office]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        with z.open(part, "w", force_zip64=True) as fh:
            fh.write(b'<?xml version="1.0"?><root><t>')
            block = b"A" * 2**20
            for _ in range(unpacked_mb):
                fh.write(block)
            fh.write(b"</t></root>")
    return out


def big_stored_docx(out: Path, mb: int) -> Path:
    """A well-formed DOCX (stored, 1:1) whose body holds `mb` MiB of tiny paragraphs: passes the zip
    checks, then needs far more memory than its size to parse (an XML tree of millions of nodes)."""
    src = SAMPLES / "handbook-1p.docx"
    para = b"<w:p><w:r><w:t>x</w:t></w:r></w:p>"
    with zipfile.ZipFile(src) as zs, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zd:
        for info in zs.infolist():
            data = zs.read(info)
            if info.filename != "word/document.xml":
                zd.writestr(info.filename, data)
                continue
            head, tail = data.split(b"<w:body>")[0] + b"<w:body>", b"</w:body>" + data.split(b"</w:body>")[1]
            zd.writestr(info.filename, head + para * (mb * 2**20 // len(para)) + tail)
    return out


def many_page_pdf(out: Path, pages: int) -> Path:
    """A valid PDF of `pages` pages of text (slow to parse: seconds per hundred pages)."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    line = b"BT /F1 10 Tf 40 %d Td (Line %d of page %d: the quick brown fox jumps over the lazy dog.) Tj ET\n"
    for p in range(pages):
        stream = b"".join(line % (800 - 14 * i, i, p) for i in range(50))
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] /Resources << /Font << /F1 3 0 R >> >>"
                    b" /Contents %d 0 R >>" % len(objs))
        kids.append(len(objs))
    objs[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), pages)
    body, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offsets.append(len(body))
        body += b"%d 0 obj\n%s\nendobj\n" % (i, o)
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    body += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    body += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    out.write_bytes(bytes(body))
    return out


def truncated(src: Path, rng: random.Random) -> bytes:
    data = src.read_bytes()
    return data[: rng.randrange(1, len(data) - 1)]


def flipped(src: Path, rng: random.Random, flips: int = 20) -> bytes:
    data = bytearray(src.read_bytes())
    for _ in range(flips):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


# kind -> (file name, builder(out_dir, rng, scale) -> Path, words one of which the reason must contain;
# None: the file must be ingested)
Builder = Callable[[Path, random.Random, float], Path]


def _write(name: str, data: Callable[[random.Random, float], bytes]) -> Builder:
    def build(out: Path, rng: random.Random, scale: float) -> Path:
        p = out / name
        p.write_bytes(data(rng, scale))
        return p
    return build


KINDS: dict[str, tuple[Builder, list[str] | None]] = {
    "truncated_pdf": (_write("truncated.pdf", lambda r, s: truncated(SAMPLES / "fake-memo.pdf", r)),
                      ["truncated: no %%EOF", "corrupt PDF", "no text found"]),
    "truncated_docx": (_write("truncated.docx", lambda r, s: truncated(SAMPLES / "handbook-1p.docx", r)),
                       ["not a valid DOCX (damaged or truncated zip"]),
    "zip_bomb_docx": (lambda o, r, s: zip_bomb(o / "bomb.docx", "docx", int(1024 * s)), ["a zip bomb?"]),
    "zip_bomb_xlsx": (lambda o, r, s: zip_bomb(o / "bomb.xlsx", "xlsx", int(1024 * s)), ["a zip bomb?"]),
    "png_named_pdf": (_write("scan.pdf", lambda r, s: PNG + r.randbytes(200)),
                      ["the file is a PNG image", "not a PDF"]),
    "pdf_named_docx": (_write("memo.docx", lambda r, s: (SAMPLES / "fake-memo.pdf").read_bytes()), None),
    "random_txt": (_write("random.txt", lambda r, s: r.randbytes(4096)),
                   ["binary data, not text", "no text encoding fits", "the file is"]),
    "random_pdf": (_write("random.pdf", lambda r, s: r.randbytes(4096)), ["not a PDF", "the file is"]),
    "random_docx": (_write("random.docx", lambda r, s: r.randbytes(4096)), ["not a valid DOCX", "the file is"]),
    "empty": (_write("empty.txt", lambda r, s: b""), ["empty file"]),
    "huge_line_txt": (_write("line.txt", lambda r, s: b"word " * int(4_000_000 * s)), None),
    "nested_html": (_write("nested.html", lambda r, s: b"<div>" * 100_000 + b"deep" + b"</div>" * 100_000),
                    ["nested more than 256 elements deep"]),
    "binary_txt": (_write("program.txt", lambda r, s: Path("/bin/ls").read_bytes()[:65536]),
                   ["the file is an ELF"]),
    "bad_utf8": (_write("bad8.txt", lambda r, s: "Grüße aus Köln. ".encode() * 100 + b"\xc3\x28 end."),
                 ["invalid UTF-8 text"]),
    "bad_utf16": (_write("bad16.txt", lambda r, s: b"\xff\xfe" + "Grüße".encode("utf-16-le") + b"\x00\xd8A"),
                  ["invalid UTF-16 text"]),
}


def build_kind(kind: str, out: Path, rng: random.Random, scale: float = 1.0) -> Path:
    """One file of `kind` in a fresh folder under `out`."""
    d = Path(tempfile.mkdtemp(prefix=kind + "-", dir=out))
    return KINDS[kind][0](d, rng, scale)


def mutants(out: Path, rng: random.Random, n: int) -> list[Path]:
    """`n` truncated and `n` bit-flipped copies of every readable sample document."""
    made = []
    for src in sorted(SAMPLES.iterdir()):
        if src.stat().st_size < 2 or src.suffix == ".md" and src.name.startswith("LICENSE"):
            continue
        for i in range(n):
            for how, data in (("cut", truncated(src, rng)), ("flip", flipped(src, rng))):
                p = out / f"{how}{i}-{src.name}"
                p.write_bytes(data)
                made.append(p)
    return made


def _settings(**over):
    from kb.settings import load_settings

    return load_settings(None, **over)


def parse_rate(isolate: bool, files: list[Path], settings_over: dict, passes: int = 2) -> dict:
    """files/s parsing `files` in one batch, sandboxed or in-process: the first pass (which loads
    the parsers) timed as `first_pass_s`, the rate from the last (steady state)."""
    from ingest.loaders import ParseError
    from ingest.pipeline import FileItem, FileParser, doc_id_for

    s = _settings(**{**settings_over, "parse.isolate": isolate})
    items = [FileItem(f, f.name, doc_id_for(str(f))) for f in files]
    times, ok = [], 0
    with FileParser(s) as parse:
        for _ in range(passes):
            t0, ok = time.perf_counter(), 0
            for it in items:
                try:
                    parse(it)
                    ok += 1
                except ParseError:
                    pass
            times.append(time.perf_counter() - t0)
    return {"isolate": isolate, "files": len(items), "parsed": ok, "first_pass_s": round(times[0], 2),
            "seconds": round(times[-1], 2), "files_per_s": round(len(items) / times[-1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="files per generated kind")
    ap.add_argument("--mutants", type=int, default=3, help="truncated and bit-flipped copies per sample")
    ap.add_argument("--scale", type=float, default=1.0, help="unpacked size of the zip bombs, GiB")
    ap.add_argument("--line-scale", type=float, default=0.05,
                    help="one-line text size, x20 MB (its chunking downstream is the slow part)")
    args = ap.parse_args()

    from bench.common import table, write_result
    from ingest.pipeline import ingest, items_from_paths

    work = Path(tempfile.mkdtemp(prefix="kb-file-fuzz-"))
    try:
        over = {"home": str(work / "home"), "models.device": "cpu", "chunking.method": "fixed"}
        samples = sorted(p for p in SAMPLES.iterdir() if p.suffix != ".md" or not p.name.startswith("LICENSE"))
        rates = [parse_rate(False, samples, over), parse_rate(True, samples, over)]

        rng = random.Random(12)
        corpus = work / "corpus"
        corpus.mkdir()
        kind_of: dict[str, str] = {}
        for kind in KINDS:
            for _ in range(args.seeds):
                scale = args.line_scale if kind == "huge_line_txt" else args.scale
                kind_of[str(build_kind(kind, corpus, rng, scale))] = kind
        (corpus / "mutants").mkdir()
        for p in mutants(corpus / "mutants", rng, args.mutants):
            kind_of[str(p)] = "mutant_" + p.suffix[1:]
        s = _settings(**over)
        items, _ = items_from_paths([corpus])
        timings: dict[str, float] = {}
        started: dict[str, float] = {}

        def on_file(source: str, status: str) -> None:
            if status == "ingested":
                return  # parse-time only: the time since the previous file's parse ended
            timings[str(corpus.parent / source)] = time.perf_counter() - started["t"]
            started["t"] = time.perf_counter()

        started["t"] = time.perf_counter()
        report = ingest(items, "fuzz", s, progress=True, on_file=on_file)  # an escape is a crash: it ends the bench
        failed = {f["path"]: f["error"] for f in report.failed}
        rows = []
        unclear_reasons: dict[str, str] = {}
        for kind in sorted(set(kind_of.values())):
            paths = [p for p, k in kind_of.items() if k == kind]
            words = KINDS[kind][1] if kind in KINDS else None
            clear = [p for p in paths if p in failed and _clear(failed[p], words)]
            unclear = [p for p in paths if p in failed and p not in clear]
            unclear_reasons.update({p: failed[p] for p in unclear})
            rows.append({"kind": kind, "files": len(paths), "clear_failures": len(clear),
                         "successes": len([p for p in paths if p not in failed]),
                         "timeouts": sum("took longer than parse.timeout_s" in failed.get(p, "") for p in paths),
                         "worker_crashes": sum("the parser crashed" in failed.get(p, "") or
                                               "the parser was killed" in failed.get(p, "") for p in paths),
                         "crashes_or_hangs": len(unclear),
                         "max_s_per_file": round(max(timings.get(p, 0.0) for p in paths), 2),
                         "reasons": sorted({failed[p][:90] for p in paths if p in failed})[:4]})
        print(table(rows, ["kind", "files", "clear_failures", "successes", "timeouts", "worker_crashes",
                           "crashes_or_hangs", "max_s_per_file"]))
        print(table(rates, ["isolate", "files", "parsed", "first_pass_s", "seconds", "files_per_s"]))
        overhead = rates[0]["files_per_s"] / rates[1]["files_per_s"] - 1
        out = write_result("file_fuzz", {
            "config": {"parse": s.parse.model_dump(), "seeds": args.seeds, "mutants": args.mutants,
                       "scale": args.scale, "line_scale": args.line_scale, "chunking": s.chunking.method},
            "kinds": rows,
            "totals": {k: sum(r[k] for r in rows) for k in ("files", "clear_failures", "successes", "timeouts",
                                                             "worker_crashes", "crashes_or_hangs")},
            "crashes_or_hangs_means": "a file whose reason is not a clear one for its kind (an escaped "
                                      "exception would end the run instead); the batch itself never stopped",
            "batch_seconds": report.seconds, "ingested": report.ingested,
            "isolation": {"runs": rates, "slowdown_vs_in_process": round(overhead, 3),
                          "note": "samples/docs (less the licence file) parsed twice each way in one "
                                  "batch: first_pass_s includes loading the parsers (in-process) or "
                                  "starting the fork server and worker (isolated); files_per_s is the "
                                  "second pass"},
            "unclear_reasons": unclear_reasons,
        })
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


UNCLEAR = ("Traceback", "the parser failed:")


def _clear(reason: str, words: list[str] | None) -> bool:
    """A reason a person can act on: one of the expected words for its kind (where the kind has
    them), and not an internal error of the parser process."""
    if not reason or any(u in reason for u in UNCLEAR):
        return False
    return words is None or any(w in reason for w in words)


if __name__ == "__main__":
    main()
