import zipfile

import pytest

from ingest.loaders import ParseError, ZipLimits, parse_file, read_text, table_html_to_text, wrap_long_lines
from tests.conftest import SAMPLES


@pytest.mark.parametrize("name, reason", [
    ("empty.txt", "empty file"),
    ("password.pdf", "password-protected"),
    ("password_protected.xlsx", "password-protected"),
])
def test_unreadable_samples_give_clear_reasons(name, reason):
    with pytest.raises(ParseError, match=reason):
        parse_file(SAMPLES / name)


def test_corrupt_and_unknown_files(tmp_path):
    bad_pdf = tmp_path / "broken.pdf"
    bad_pdf.write_bytes(b"%PDF-1.4\n" + b"\x00garbage" * 50)
    with pytest.raises(ParseError, match="PDF"):
        parse_file(bad_pdf)
    bad_docx = tmp_path / "broken.docx"
    bad_docx.write_bytes(b"this is not a zip file")
    with pytest.raises(ParseError, match="not a valid DOCX: no zip header"):
        parse_file(bad_docx)
    odd = tmp_path / "thing.xyz"
    odd.write_text("hello")
    with pytest.raises(ParseError, match="unsupported file type '.xyz'"):
        parse_file(odd)
    blank = tmp_path / "blank.md"
    blank.write_text("   \n\n  ")
    with pytest.raises(ParseError, match="only whitespace"):
        parse_file(blank)


def test_size_limit(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 300_000)
    with pytest.raises(ParseError, match="too large"):
        parse_file(big, max_file_mb=1)


def test_encodings_decode(tmp_path):
    assert "Hamburgers are delicious" in read_text(SAMPLES / "fake-text-utf-16.txt")
    assert read_text(SAMPLES / "umlauts-non-utf8.md").count("können") == 2
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("知识库平台支持多种编码格式的文本文件，包括国标码。".encode("gbk"))
    assert "知识库平台" in read_text(gbk)
    cp = tmp_path / "cp.txt"
    cp.write_bytes("Price: 20 € – “quoted” café".encode("cp1252"))
    assert read_text(cp) == "Price: 20 € – “quoted” café"


def test_structure_is_kept():
    blocks = parse_file(SAMPLES / "fake-power-point.pptx")
    kinds = {b.kind for b in blocks}
    assert {"title", "list"} <= kinds
    assert all(b.page for b in blocks)
    pdf = parse_file(SAMPLES / "fake-memo.pdf")
    assert pdf[0].page == 1 and any("bottles of water" in b.text for b in pdf)


def test_tables_keep_rows_together():
    blocks = parse_file(SAMPLES / "stanley-cups.xlsx")
    tables = [b for b in blocks if b.kind == "table"]
    assert tables and "Team | Location | Stanley Cups" in tables[0].text.splitlines()[0]
    md = parse_file(SAMPLES / "simple-table.md")
    assert md[0].kind == "table" and len(md[0].text.splitlines()) >= 2
    html = "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>"
    assert table_html_to_text(html) == "a | b\n1 | 2"


def test_csv_is_a_table(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("name,price\napple,1.5\npear,2\n")
    (b,) = parse_file(f)
    assert b.kind == "table" and b.text == "name | price\napple | 1.5\npear | 2"


def test_chinese_prose_is_not_taken_for_a_title(tmp_path):
    f = tmp_path / "zh.txt"
    body = ("基于《跑跑卡丁车》与《泡泡堂》上所开发的游戏，由韩国Nexon开发与发行。"
            "中国大陆由盛大游戏运营，这是时隔6年再次授予其游戏运营权。")
    f.write_text(f"泡泡战士\n\n{body}\n", encoding="utf-8")
    blocks = parse_file(f)
    assert body in [b.text for b in blocks if b.kind == "text"]


def _zip_with(path, name: str, size_mb: int, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        with z.open(name, "w", force_zip64=True) as fh:
            for _ in range(size_mb):
                fh.write(b"\0" * 2**20)
    return path


def test_zip_bombs_and_damaged_zips_fail_before_unpacking(tmp_path):
    bomb = _zip_with(tmp_path / "bomb.xlsx", "xl/workbook.xml", 64)
    with pytest.raises(ParseError, match=r"over the limit parse.max_unzipped_mb=32 \(a zip bomb\?\)"):
        parse_file(bomb, limits=ZipLimits(max_unzipped_mb=32))
    with pytest.raises(ParseError, match=r"member 'xl/workbook.xml' expands [\d,]+:1 .*parse.max_zip_ratio=100"):
        parse_file(bomb)
    good = (SAMPLES / "handbook-1p.docx").read_bytes()
    cut = tmp_path / "cut.docx"
    cut.write_bytes(good[: len(good) * 2 // 3])
    with pytest.raises(ParseError, match=r"not a valid DOCX \(damaged or truncated zip"):
        parse_file(cut)


def test_the_content_decides_the_format(tmp_path):
    pdf_as_docx = tmp_path / "memo.docx"
    pdf_as_docx.write_bytes((SAMPLES / "fake-memo.pdf").read_bytes())
    assert any("bottles of water" in b.text for b in parse_file(pdf_as_docx))
    docx_as_xlsx = tmp_path / "handbook.xlsx"
    docx_as_xlsx.write_bytes((SAMPLES / "handbook-1p.docx").read_bytes())
    assert [b.text for b in parse_file(docx_as_xlsx)] == [b.text for b in parse_file(SAMPLES / "handbook-1p.docx")]
    png = tmp_path / "scan.pdf"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ParseError, match="the file is a PNG image .*, not a PDF"):
        parse_file(png)
    zipped = tmp_path / "notes.txt"
    _zip_with(zipped, "a.bin", 1)
    with pytest.raises(ParseError, match=r"the file is a zip archive, not text \(.txt\)"):
        parse_file(zipped)


def test_text_starting_like_a_short_signature_or_in_utf16_without_bom_is_text(tmp_path):
    files = {"health.csv": b"BMI,weight,height\n22,70,180\n",  # "BM": a bitmap's two bytes
             "mz.md": b"MZ Holdings: staff travel in economy class.",  # "MZ": an executable's
             "u16.txt": "Employees get 15 days of leave. 员工享有十五天年假。".encode("utf-16-le")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert "BMI" in read_text(tmp_path / "health.csv") and "MZ Holdings" in read_text(tmp_path / "mz.md")
    assert read_text(tmp_path / "u16.txt") == "Employees get 15 days of leave. 员工享有十五天年假。"
    assert any("MZ Holdings" in b.text for b in parse_file(tmp_path / "mz.md"))
    bmp = tmp_path / "scan.txt"
    bmp.write_bytes(b"BM" + bytes(range(256)) * 4)
    with pytest.raises(ParseError, match="the file is a BMP image"):
        parse_file(bmp)


def test_bad_text_gets_specific_reasons(tmp_path):
    cases = {
        "u8.txt": ("héllo wörld. ".encode() * 50 + b"\xff\xfe\x80", "invalid UTF-8 text: 3 byte"),
        "u16.txt": (b"\xff\xfe" + "hello".encode("utf-16-le") + b"\x00\xd8A", "invalid UTF-16 text"),
        "bin.txt": (bytes(range(256)) * 4, "binary data, not text: NUL bytes"),
        "deep.html": (("<div>" * 5000 + "deep text" + "</div>" * 5000).encode(), "nested more than 256"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ParseError, match=reason):
            parse_file(tmp_path / name)


def test_a_huge_single_line_is_wrapped_not_quadratic(tmp_path):
    assert wrap_long_lines("ab cd ef", 5) == "ab\n\ncd ef"
    assert wrap_long_lines("x" * 12, 5) == "xxxxx\n\nxxxxx\n\nxx"
    line = tmp_path / "line.txt"
    line.write_text("word " * 60_000)  # 300,000 characters: minutes for the text partitioner unwrapped
    blocks = parse_file(line, max_line_chars=10_000)
    assert len(blocks) == 30 and max(len(b.text) for b in blocks) <= 10_000
