import pytest

from ingest.loaders import ParseError, parse_file, read_text, table_html_to_text
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
    with pytest.raises(ParseError, match="corrupt DOCX"):
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
    assert table_html_to_text("<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>") == "a | b\n1 | 2"


def test_csv_is_a_table(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("name,price\napple,1.5\npear,2\n")
    (b,) = parse_file(f)
    assert b.kind == "table" and b.text == "name | price\napple | 1.5\npear | 2"


def test_chinese_prose_is_not_taken_for_a_title(tmp_path):
    f = tmp_path / "zh.txt"
    body = "基于《跑跑卡丁车》与《泡泡堂》上所开发的游戏，由韩国Nexon开发与发行。中国大陆由盛大游戏运营，这是时隔6年再次授予其游戏运营权。"
    f.write_text(f"泡泡战士\n\n{body}\n", encoding="utf-8")
    blocks = parse_file(f)
    assert body in [b.text for b in blocks if b.kind == "text"]
