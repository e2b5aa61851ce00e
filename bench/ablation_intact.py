"""Re-read the retrieval ablation over the questions whose gold paragraph survived ingestion intact.

unstructured's text partitioner treats "·" (the middle dot of transliterated names, common in
Chinese) as a list bullet: it cuts the text there and can turn the short piece after it into a
title, which leaves the chunk text. A question whose gold paragraph is not, as contiguous text
(whitespace ignored), in its document's stored article text is "damaged": the strict measures
then depend on how a row's hits straddle the gap. This script splits every row's "answer in
budget" and its pairing with the reference into intact and damaged questions.

    python -m bench.ablation_intact --result bench/results/ablation_cmrc.json --work work/ablate
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from math import comb
from pathlib import Path

from bench.common import write_result
from eval.ablate import paired
from eval.context import norm
from eval.data import load_questions

ROOT = Path(__file__).resolve().parent.parent


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test (McNemar) p-value of `gained` against `lost` discordant pairs."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def damaged_ids(kb_dir: Path, questions_file: Path) -> set[str]:
    """Ids of the in-KB questions whose gold paragraph is not intact in its document's article text."""
    con = sqlite3.connect(kb_dir / "store.sqlite")
    articles = {src: raw for src, raw in con.execute(
        "SELECT d.source, k.raw_text FROM key_infos k JOIN documents d ON d.doc_id = k.doc_id WHERE k.level='article'")}
    con.close()
    by_name = {Path(src).name: norm(text) for src, text in articles.items()}
    questions, _ = load_questions(questions_file)
    return {q.id for q in questions if q.meta.get("in_kb", True) and norm(q.context) not in by_name[q.meta["doc"]]}


def split_rows(result: dict, work: Path) -> list[dict]:
    out = []
    for corpus in result["corpora"]:
        rows = [r for r in result["rows"] if r["corpus"] == corpus]
        bad = damaged_ids(work / "kb" / rows[0]["build"]["kb"], work / corpus / "questions.jsonl")
        for r in rows:
            entry = {"corpus": corpus, "row": r["row"], "damaged": len(bad)}
            for part, damaged in (("intact", False), ("damaged", True)):
                qs = [q for q in r["per_question"] if (q["id"] in bad) == damaged]
                pair = paired(rows[0]["per_question"], qs, "answer_in_budget")
                gained, lost = pair["gained"], pair["lost"]
                entry[part] = {"n": len(qs), "answer_in_budget": round(sum(bool(q.get("answer_in_budget")) for q in qs)
                                                                      / max(1, len(qs)), 4),
                               "gained": gained, "lost": lost, "sign_test_p": round(sign_test(gained, lost), 4)}
            out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--result", default=str(ROOT / "bench" / "results" / "ablation_cmrc.json"))
    ap.add_argument("--work", default=str(ROOT / "work" / "ablate"), help="the ablation's --work folder (its KBs)")
    ap.add_argument("--name", default="ablation_cmrc_intact")
    args = ap.parse_args()
    result = json.loads(Path(args.result).read_text(encoding="utf-8"))
    rows = split_rows(result, Path(args.work))
    path = write_result(args.name, {"source_result": args.result, "source_commit": result["provenance"]["commit"],
                                    "rows": rows}, data=(Path(args.result),))
    for r in rows:
        i, d = r["intact"], r["damaged"]
        print(f"{r['corpus']:<11}{r['row']:<26} intact n={i['n']} {i['answer_in_budget']:.3f} "
              f"+{i['gained']}/-{i['lost']} p={i['sign_test_p']:.3f} | "
              f"damaged n={d['n']} {d['answer_in_budget']:.3f} +{d['gained']}/-{d['lost']}")
    print(path)


if __name__ == "__main__":
    main()
