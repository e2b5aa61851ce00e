"""Print the benchmark results under bench/results/ as Markdown tables (for the README).

    python bench/tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def md(rows: list[list], head: list[str]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def search_table() -> str:
    rows = []
    for name in ("search_cpu", "search_gpu"):
        f = RESULTS / f"{name}.json"
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        for r in d["runs"]:
            s, p = r["setting"], r["project"]
            rows.append([f"{s['vectors']:,}", s["index"], s["backend"], p["build_s"], f"{p['qps_batch1']:,.0f}",
                         f"{p['qps_batch64']:,.0f}", p["recall@10"], d["device"].split(" (")[0]])
    return md(rows, ["vectors", "index", "backend", "build s", "QPS batch 1", "QPS batch 64", "recall@10", "device"])


def ingest_table() -> str:
    rows = []
    for name in ("ingest_cpu", "ingest_gpu"):
        f = RESULTS / f"{name}.json"
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        dev = d["device"].split(" (")[0]
        for r in d["runs"]:
            s, p, b = r["setting"], r["project"], r.get("baseline", {})
            if s["part"] == "pipeline":
                rows.append(["parse + clean", "-", "-", f"{p['docs_per_s']} docs/s", "-", dev])
                rows.append(["NSP chunking", "minilm-l6 (random head)", 64, f"{p['chunks_per_s']} chunks/s", "-", dev])
                rows.append(["key information", "-", "-", f"{p['key_info_chunks_per_s']} chunks/s", "-", dev])
            elif s["part"] == "embed":
                rows.append(["embeddings", s["model_shape"], s["batch_size"], f"{p['texts_per_s']} texts/s",
                             f"{b['texts_per_s']} texts/s", dev])
            elif s["part"] == "nsp":
                rows.append(["NSP pairs (cross head)", s["model_shape"], s["batch_size"], f"{p['pairs_per_s']} pairs/s",
                             f"{b['pairs_per_s']} pairs/s", dev])
    return md(rows, ["stage", "model shape", "batch", "batched", "one at a time", "device"])


if __name__ == "__main__":
    print(ingest_table())
    print()
    print(search_table())
