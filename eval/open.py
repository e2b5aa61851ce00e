"""Open-ended evaluation: run the full answer chain on questions with gold answers.

Per question: exact match, token F1 and ROUGE-L (CJK characters as tokens), whether the gold
answer is inside the reply, whether the reply is supported by the retrieved context, whether
the retrieved context held a gold answer at all, refusal and fallback, latency; optionally an
LLM judge's 1-5 grade scaled to 0-1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from eval.data import Question
from eval.retrieval import relevant
from eval.textmetrics import contains_answer, exact_match, f1, rouge_l
from ingest.nsp import terms
from serve.compliance import term_share

CITATION = re.compile(r"\[\d+\]")


def evaluate_open(chain, questions: Sequence[Question], *, judge=None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    min_grounding = chain.settings.compliance.min_grounding
    rows = []
    for q in tqdm(questions, desc="eval open", unit="q", disable=not progress):
        r = chain.ask(q.question)
        ctx_terms = set().union(*(terms(s["text"]) for s in r["sources"])) if r["sources"] else set()
        refused = chain.is_refusal(r["standalone_question"], r["internal"]["draft"])
        row = {"id": q.id, "question": q.question, "gold": q.answers[0], "answer": r["answer"],
               "exact_match": exact_match(r["answer"], q.answers), "f1": f1(r["answer"], q.answers),
               "rouge_l": rouge_l(r["answer"], q.answers), "contains_answer": contains_answer(r["answer"], q.answers),
               "supported": float(not r["fallback"] and term_share(r["answer"], ctx_terms) >= min_grounding),
               "context_has_answer": float(any(relevant(s["text"], q) for s in r["sources"])),
               "refused": float(refused), "fallback": float(r["fallback"]), "reason": r["reason"] or "",
               "cites": float(bool(CITATION.search(r["answer"]))) if not r["fallback"] else 0.0,
               "in_kb": bool(q.meta.get("in_kb", True)), "seconds": r["seconds"]}
        if judge is not None:
            row["judge"] = judge.grade(q.question, q.answers, r["answer"])
        rows.append(row)
    return summarize(rows, chain)


def summarize(rows: list[dict], chain=None) -> dict:
    """Answer quality over the questions whose passage is in the KB; fallbacks counted apart for
    those (false fallbacks) and for questions about documents not in the KB (correct ones);
    `fallback_rate` is over every question asked."""
    n = len(rows)
    mean = lambda key, rs: round(float(np.mean([r[key] for r in rs])), 4) if rs else 0.0  # noqa: E731
    inside = [r for r in rows if r.get("in_kb", True)]
    outside = [r for r in rows if not r.get("in_kb", True)]
    answered = [r for r in inside if not r["fallback"]]
    held = [r for r in inside if r["context_has_answer"]]
    lat = np.array([r["seconds"] for r in rows]) if rows else np.zeros(1)
    out = {"n": n, "n_in_kb": len(inside), "n_not_in_kb": len(outside),
           "exact_match": mean("exact_match", inside), "f1": mean("f1", inside), "rouge_l": mean("rouge_l", inside),
           "contains_answer": mean("contains_answer", inside), "supported_rate": mean("supported", inside),
           "context_has_answer": mean("context_has_answer", inside), "refusal_rate": mean("refused", inside),
           "fallback_rate": mean("fallback", rows), "answered": len(answered),
           "citation_rate": mean("cites", answered), "f1_answered": mean("f1", answered),
           "false_fallback_rate": mean("fallback", inside),
           "false_fallback_when_retrieved": mean("fallback", held),
           "unanswerable_fallback_rate": mean("fallback", outside) if outside else None,
           "latency_mean_s": round(float(lat.mean()), 4),
           "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
           "latency_p95_s": round(float(np.percentile(lat, 95)), 4)}
    graded = [r["judge"] for r in rows if r.get("judge") is not None]
    if any("judge" in r for r in rows):
        out["judge"] = round(float(np.mean(graded)), 4) if graded else None
        out["judge_unparsed"] = sum(r.get("judge") is None for r in rows)
    if chain is not None:
        out["kb"] = chain.kb.name
        out["mode"] = "extractive" if chain.llm is None else chain.llm.name
    out["per_question"] = rows
    return out


def write_report(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.report import figure_png, html_table, img, write_html

    rows = result["per_question"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].hist([r["f1"] for r in rows if r.get("in_kb", True)], bins=20, range=(0, 1), color="#4a7ab5")
    axes[0].set_xlabel("F1 per question")
    axes[0].set_ylabel("questions")
    axes[1].hist([r["seconds"] for r in rows], bins=30, color="#5a9e6f")
    axes[1].set_xlabel("latency per question (s)")
    fig.suptitle(f"{result.get('kb', '')}: n={result['n']}")
    rates = ["exact_match", "f1", "rouge_l", "contains_answer", "supported_rate", "context_has_answer",
             "citation_rate", "refusal_rate", "false_fallback_rate", "false_fallback_when_retrieved"]
    rates += [k for k in ("unanswerable_fallback_rate", "judge") if result.get(k) is not None]
    fig2, ax = plt.subplots(figsize=(8, 3))
    ax.bar(rates, [result[k] for k in rates], color="#4a7ab5")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=30)
    reasons: dict[str, int] = {}
    for r in rows:
        if r["fallback"]:
            key = r["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    worst = sorted(rows, key=lambda r: (r["f1"], -r["seconds"]))[:30]
    summary = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
    write_html(path, "Open-ended answer evaluation",
               [("Summary", html_table([summary])), ("Scores", img(figure_png(fig2))),
                ("Distributions", img(figure_png(fig))),
                ("Fallback reasons", html_table([{"reason": k, "questions": v} for k, v in
                                                 sorted(reasons.items(), key=lambda x: -x[1])])),
                ("Lowest F1 (first 30)", html_table(worst, ["id", "question", "gold", "answer", "f1", "reason"])),
                ("Skipped rows", html_table([{"problem": p} for p in result.get("skipped_rows", [])]))], result)
