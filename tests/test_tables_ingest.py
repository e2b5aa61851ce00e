"""Tables that keep their headers (ingest/tables.py) and plain text that keeps its "·"."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ingest.chunking import to_units
from ingest.loaders import parse_file
from ingest.tables import Table, format_number, html_tables, read_xlsx, table_units
from ingest.types import Block, ParsedDocument

REGIONS = ["North", "South", "East", "West", "Central", "Coastal"]
PRODUCTS = ["Aurora Lamp", "Borealis Kettle", "Cedar Stool", "Dune Blanket", "Ember Grill",
            "Fjord Mug", "Glacier Fan", "Harbor Clock"]
ZH_REGIONS = ["华北", "华南", "华东", "华中", "西南", "西北", "东北", "港澳"]
ZH_PRODUCTS = ["青花瓷杯", "紫砂茶壶", "竹编果篮", "丝绸围巾", "景泰蓝花瓶", "檀木梳子", "宣纸画册", "铜制香炉",
               "苏绣屏风", "漆器果盒"]


def price(i: int, j: int) -> float:
    return 10 + 7 * i + 3 * j + 0.5


def write_workbook(path: Path) -> None:
    """Sheet 'Regional prices': a merged title row, then a two-row header (Product merged down,
    each region merged across its Price/Stock columns). Sheet 'Price list': long format with the
    region merged down over its products, a currency number format, and an empty column."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Regional prices"
    ws.append(["Regional price list 2024"])
    ws.merge_cells(start_row=1, start_column=1, end_row=1, end_column=1 + 2 * 3)
    ws.append(["Product"] + [x for r in REGIONS[:3] for x in (r, None)])
    ws.append([None] + ["Price", "Stock"] * 3)
    ws.merge_cells("A2:A3")
    for k in range(3):
        ws.merge_cells(start_row=2, start_column=2 + 2 * k, end_row=2, end_column=3 + 2 * k)
    for j, p in enumerate(PRODUCTS):
        ws.append([p] + [x for i in range(3) for x in (price(i, j), 100 + j)])
    ws2 = wb.create_sheet("Price list")
    ws2.append(["Region", "Product", None, "Price"])
    for i, r in enumerate(REGIONS):
        first = ws2.max_row + 1
        for j, p in enumerate(PRODUCTS):
            ws2.append([r if j == 0 else None, p, None, price(i, j)])
            ws2.cell(ws2.max_row, 4).number_format = '"$"#,##0.00'
        ws2.merge_cells(start_row=first, start_column=1, end_row=first + len(PRODUCTS) - 1, end_column=1)
    wb.save(path)


def zh_csv() -> str:
    lines = ["地区,产品,价格（元）"]
    lines += [f"{r},{p},{20 + 11 * i + 4 * j}" for i, r in enumerate(ZH_REGIONS) for j, p in enumerate(ZH_PRODUCTS)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- readers

def test_xlsx_merged_cells_and_two_row_header(tmp_path):
    f = tmp_path / "prices.xlsx"
    write_workbook(f)
    (name1, t1), (name2, t2) = read_xlsx(f)
    assert (name1, name2) == ("Regional prices", "Price list")
    assert t1.title == "Regional price list 2024"
    assert t1.columns == ["Product", "North / Price", "North / Stock", "South / Price", "South / Stock",
                          "East / Price", "East / Stock"]
    assert t1.rows[0] == ["Aurora Lamp", "10.5", "100", "17.5", "100", "24.5", "100"]
    assert len(t1.rows) == len(PRODUCTS)
    assert t2.columns == ["Region", "Product", "Price"]  # the empty column is dropped
    assert t2.rows[len(PRODUCTS) + 2] == ["South", "Cedar Stool", "$23.50"]  # merged region filled down
    assert len(t2.rows) == len(REGIONS) * len(PRODUCTS)


def test_xlsx_unmerged_group_header_and_blank_rows(tmp_path):
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append([])
    ws.append(["Item", "Q1", None, "Q2", None])
    ws.append(["Item", "Units", "Revenue", "Units", "Revenue"])
    ws.append([])
    ws.append(["Tea", 3, 0.25, 4, 0.5])
    ws.cell(5, 3).number_format = "0%"
    f = tmp_path / "q.xlsx"
    wb.save(f)
    ((_, t),) = read_xlsx(f)
    assert t.columns == ["Item", "Q1 / Units", "Q1 / Revenue", "Q2 / Units", "Q2 / Revenue"]
    assert t.rows == [["Tea", "3", "25%", "4", "0.5"]]


def test_number_formats():
    assert format_number(1234.5, "#,##0.00") == "1,234.50"
    assert format_number(0.125, "0.0%") == "12.5%"
    assert format_number(12, '"¥"#,##0.00') == "¥12.00"
    assert format_number(7, '0"件"') == "7件"
    assert format_number(13.0, "General") == "13"


def test_html_rowspan_colspan_and_th_header():
    html = ("<table><caption>Prices</caption><thead><tr><th rowspan='2'>Product</th>"
            "<th colspan='2'>North</th></tr><tr><th>Price</th><th>Stock</th></tr></thead>"
            "<tbody><tr><td rowspan='2'>Pear</td><td>4</td><td>5</td></tr><tr><td>6</td><td>7</td></tr>"
            "</tbody></table>")
    (t,) = html_tables(html)
    assert t.title == "Prices"
    assert t.columns == ["Product", "North / Price", "North / Stock"]
    assert t.rows == [["Pear", "4", "5"], ["Pear", "6", "7"]]
    (plain,) = html_tables("<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>2</td></tr></table>")
    assert plain.columns == ["a", "b"] and plain.rows == [["1", "2"]]


def test_html_file_keeps_spans(tmp_path):
    f = tmp_path / "t.html"
    f.write_text("<html><body><h1>Stock</h1><table><tr><th>Region</th><th>Product</th><th>Price</th></tr>"
                 "<tr><td rowspan='2'>East</td><td>Lamp</td><td>3</td></tr><tr><td>Mug</td><td>4</td></tr>"
                 "</table></body></html>", encoding="utf-8")
    (table,) = [b for b in parse_file(f) if b.kind == "table"]
    assert table.table is not None and table.table.rows[1] == ["East", "Mug", "4"]


# ---------------------------------------------------------------- units

def big_table(n: int = 40) -> Table:
    return Table([["Region", "Product", "Price"]], [[f"R{i % 5}", f"P{i}", str(i)] for i in range(n)], "Cap")


def test_row_units_repeat_the_column_names():
    t = big_table()
    units = table_units(t, max_chars=80, whole_chars=100)
    assert len(units) == 40
    assert all(re.fullmatch(r"Region: R\d; Product: P\d+; Price: \d+", u) for u in units)
    grouped = table_units(t, max_chars=120, whole_chars=100, rows_per_unit=3)
    assert all(line.startswith("Region: ") for u in grouped for line in u.split("\n"))
    assert max(len(u.split("\n")) for u in grouped) == 3 and all(len(u) <= 120 for u in grouped)
    assert table_units(t, max_chars=80, whole_chars=10_000) == [t.text]


def test_a_long_row_is_cut_between_cells_with_its_key():
    t = Table([["Name", "A", "B", "C"]], [["Widget", "x" * 30, "y" * 30, "z" * 30]])
    pieces = table_units(t, max_chars=60, whole_chars=10)
    assert len(pieces) > 1 and all(p.startswith("Name: Widget; ") for p in pieces)
    assert all(len(p) <= 60 for p in pieces)


def test_chunk_units_never_split_a_row_from_its_header():
    from ingest.chunking import FixedChunker, SentenceChunker

    doc = ParsedDocument("p", "s", "d", "h", [Block("Sheet", "title"), Block("Before the table."),
                                              Block(big_table().text, "table", table=big_table()),
                                              Block("After the table.")])
    units = to_units(doc, max_chars=80, table_whole_chars=100)
    rows = [u for u in units if u.atomic]
    assert len(rows) == 40 and all(u.title_path == ("Sheet", "Cap") for u in rows)
    assert len({u.section for u in rows}) == 40  # no chunker merges two rows or a row and prose
    for chunker in (SentenceChunker(), FixedChunker(size=200, overlap=0)):
        (chunks,) = chunker.chunk_many([units])
        for c in chunks:
            for line in c.text.split("\n"):
                if "P" in line and "Price" in line or re.search(r"\bP\d+\b", line):
                    assert line.startswith("Region: ") and "Product: " in line and "Price: " in line
    whole = to_units(doc, max_chars=80)  # table_whole_chars defaults to max_chars
    assert len([u for u in whole if u.atomic]) == 40
    assert len([u for u in to_units(doc, 80, table_whole_chars=5000) if u.atomic]) == 1


# ---------------------------------------------------------------- end to end

@pytest.fixture()
def table_kb(kb, tmp_path):
    from ingest.pipeline import FileItem, doc_id_for

    folder = tmp_path / "tables"
    folder.mkdir()
    write_workbook(folder / "prices.xlsx")
    (folder / "价格表.csv").write_text(zh_csv(), encoding="utf-8")
    items = [FileItem(p, p.name, doc_id_for(str(p.resolve()))) for p in sorted(folder.iterdir())]
    report = kb.add_items(items, progress=False)
    assert report["ingested"] == 2, report
    return kb


def test_a_row_question_finds_the_row_with_its_header(table_kb):
    i, j = REGIONS.index("East"), PRODUCTS.index("Glacier Fan")
    (hit, *_) = table_kb.search("what is the price of Glacier Fan in region East")
    assert "Region: East" in hit.text and "Product: Glacier Fan" in hit.text
    assert f"Price: ${price(i, j):.2f}" in hit.text
    assert "Harbor Clock" not in hit.text  # the row, not the whole table
    i, j = ZH_REGIONS.index("华东"), ZH_PRODUCTS.index("竹编果篮")
    (hit, *_) = table_kb.search("竹编果篮在华东地区的价格是多少")
    assert f"地区: 华东; 产品: 竹编果篮; 价格（元）: {20 + 11 * i + 4 * j}" in hit.text
    assert "紫砂茶壶" not in hit.text


# ---------------------------------------------------------------- the "·" of transliterated names

def _non_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _assert_round_trip(path: Path) -> None:
    blocks = parse_file(path)
    assert _non_space("".join(b.text for b in blocks)) == _non_space(path.read_text(encoding="utf-8"))


def test_middle_dot_names_survive_plain_text(tmp_path):
    text = ("著名演员安东尼·霍普金斯出演了这部电影，导演是乔治·卢卡斯。\n"
            "·霍普金斯在行首。\n\n第二段提到了玛丽·居里和皮埃尔·居里的发现。\n\n"
            "Jean-Pierre Balligand（让-皮埃尔·巴利冈）是法国政治家。\n")
    for ext in (".txt", ".rst", ".md"):
        f = tmp_path / f"names{ext}"
        f.write_text(text, encoding="utf-8")
        _assert_round_trip(f)
        assert not any(b.kind in {"title", "list"} for b in parse_file(f)), ext


def test_real_bullets_stay_list_items(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("报销须知\n\n· 发票须在30天内提交\n· 出差须经主管批准\n• 住宿标准按城市分级\n\n"
                 "约翰·史密斯负责审核。\n", encoding="utf-8")
    blocks = parse_file(f)
    items = [b.text for b in blocks if b.kind == "list"]
    assert items == ["发票须在30天内提交", "出差须经主管批准", "住宿标准按城市分级"]
    assert any(b.text == "约翰·史密斯负责审核。" for b in blocks)


def test_cmrc_paragraphs_with_middle_dots_round_trip(tmp_path):
    src = Path("/work/shared/data/cmrc2018/cmrc2018_trial.json")
    if not src.is_file():
        pytest.skip("CMRC 2018 data not present")
    data = json.loads(src.read_text(encoding="utf-8"))["data"]
    paras = [p["context"] for a in data for p in a["paragraphs"] if "·" in p["context"]][:50]
    assert len(paras) == 50
    f = tmp_path / "cmrc.txt"  # blank-line paragraphs: what made unstructured split at every "·"
    f.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    _assert_round_trip(f)
    assert [b.text for b in parse_file(f)] == [p.strip() for p in paras]


def test_table_settings_reach_the_chunker(settings, tmp_path):
    from ingest.pipeline import FileItem, doc_id_for
    from retrieval.knowledge_base import KnowledgeBase

    settings.chunking.table_rows_per_unit = 4
    f = tmp_path / "价格表.csv"
    f.write_text(zh_csv(), encoding="utf-8")
    kb = KnowledgeBase(settings, "rows4", create=True)
    report = kb.add_items([FileItem(f, f.name, doc_id_for(str(f.resolve())))], progress=False)
    assert report["chunks"] == -(-len(ZH_REGIONS) * len(ZH_PRODUCTS) // 4)


def test_a_row_with_one_long_first_cell_is_cut_not_truncated():
    t = Table([["Name", "A"]], [["W" * 100, ""], ["x", "y"]])
    units = table_units(t, max_chars=60, whole_chars=10)
    assert "".join(units[:-1]) == "Name: " + "W" * 100 and units[-1] == "Name: x; A: y"
    assert all(len(u) <= 60 for u in units)


def test_xlsx_single_value_rows_beyond_a_title_stay_in_the_table(tmp_path):
    """Leading rows of one value each become the sheet's title only as far as a title path keeps
    them (200 chars): the rest were cut off the title path and lost."""
    from openpyxl import Workbook

    lines = [f"第{i}条：报销单据须在三十天内提交财务部门审核，逾期不予受理，特殊情况需部门负责人签字说明。"
             for i in range(1, 9)]
    wb = Workbook()
    ws = wb.active
    for i, line in enumerate(lines, 1):
        ws.cell(i, 1).value = line
    ws.cell(len(lines), 3).value = "签字：王五"
    f = tmp_path / "notes.xlsx"
    wb.save(f)
    ((_, t),) = read_xlsx(f)
    assert len(t.title) <= 200
    units = to_units(ParsedDocument("p", "s", "d", "h", parse_file(f)))
    kept = "\n".join(" / ".join(u.title_path) + "\n" + u.text for u in units)
    assert all(line in kept for line in lines) and "签字：王五" in kept
