"""Retrieval quality: recall@k, MRR and nDCG@k of a knowledge base on a question set.

A hit is relevant when its raw text contains one of the question's gold answers or its gold
context (DESIGN.md). `recall@k_strict` also asks that the hit come from the gold context, so a
short answer that happens to occur in an unrelated passage does not count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from eval.data import Question
from eval.report import figure_png, html_table, img, write_html


def _norm(s: str) -> str:
    return "".join(s.split()).lower()


def relevant(text: str, q: Question) -> bool:
    t = _norm(text)
    if any(_norm(a) and _norm(a) in t for a in q.answers):
        return True
    return bool(q.context) and _norm(q.context) in t


def from_context(text: str, q: Question) -> bool:
    """The hit's text is part of the gold context (or contains it)."""
    if not q.context:
        return True
    t, c = _norm(text).rstrip("…"), _norm(q.context)
    return t in c or c in t or (len(t) > 20 and t[: len(t) // 2] in c)


def metrics(rels: Sequence[Sequence[bool]], k: int) -> dict:
    n = len(rels)
    rec1 = sum(bool(r[:1] and r[0]) for r in rels) / n
    reck = sum(any(r[:k]) for r in rels) / n
    mrr = sum(next((1 / (i + 1) for i, x in enumerate(r[:k]) if x), 0.0) for r in rels) / n
    ndcg = 0.0
    for r in rels:
        dcg = sum(1 / math.log2(i + 2) for i, x in enumerate(r[:k]) if x)
        ideal = sum(1 / math.log2(i + 2) for i in range(min(k, sum(r[:k])))) or 1.0
        ndcg += dcg / ideal
    return {"recall@1": rec1, f"recall@{k}": reck, "mrr": mrr, f"ndcg@{k}": ndcg / n, "n": n}


def evaluate_retrieval(kb, questions: Sequence[Question], k: int = 5, batch: int = 64,
                       progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    rels, strict, per_q = [], [], []
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(questions), batch), desc="eval retrieval", disable=not progress, unit="batch"):
        qs = questions[s : s + batch]
        for q, hits in zip(qs, kb.search_many([q.question for q in qs], k)):
            r = [relevant(h.text, q) for h in hits]
            rels.append(r)
            strict.append([x and from_context(h.text, q) for x, h in zip(r, hits)])
            per_q.append({"id": q.id, "question": q.question, "rank": next((i + 1 for i, x in enumerate(r) if x), None)})
    seconds = time.perf_counter() - t0
    out = {k_: round(v, 4) if isinstance(v, float) else v for k_, v in metrics(rels, k).items()}
    out[f"recall@{k}_strict"] = round(sum(any(r) for r in strict) / len(strict), 4)
    out["k"] = k
    out["kb"] = kb.name
    out["queries_per_s"] = round(len(questions) / seconds, 2)
    out["recall_curve"] = {str(i): round(sum(any(r[:i]) for r in rels) / len(rels), 4) for i in range(1, k + 1)}
    out["per_question"] = per_q
    return out


def write_report(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    curve = result["recall_curve"]
    ax.plot([int(x) for x in curve], list(curve.values()), marker="o")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"recall@k on {result['kb']} (n={result['n']})")
    summary = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
    missed = [q for q in result["per_question"] if q["rank"] is None][:50]
    write_html(path, f"Retrieval evaluation: {result['kb']}",
               [("Summary", html_table([summary])), ("Recall by k", img(figure_png(fig))),
                ("Questions not retrieved (first 50)", html_table(missed, ["id", "question"]))], result)
