"""Retrieval quality: recall@k, MRR and nDCG@k of a knowledge base on a question set, and what
the returned context is made of.

A hit is relevant when its raw text contains one of the question's gold answers or its gold
context (DESIGN.md). For questions with a gold context (`eval.context`): `recall@k_strict` asks
that the answer lie in the part of a hit that comes from the gold paragraph (a short answer that
occurs in an unrelated passage does not count); `context_precision@k` is the share of the top-k
hits' characters that come from the gold paragraph and `chars@k` their length.
`answer_in_budget` asks the same of a fixed number of characters: the hits in rank order (up to
`fill_hits` of them) joined and cut at `budget` (`answer.max_context_chars` by default), so every
configuration hands over the same amount of text and returning whole documents is not rewarded;
`context_precision_budget` is that text's share from the gold paragraph. `answer_to_llm` and
`chars_to_llm` describe what the answer chain itself hands the LLM: its first `answer.k` hits cut
to the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from eval.context import norm, score_texts
from eval.data import Question
from eval.report import figure_png, html_table, img, write_html


def relevant(text: str, q: Question) -> bool:
    """Whether `text` contains one of the question's answers or its context (both normalized)."""
    t = norm(text)
    if any(norm(a) and norm(a) in t for a in q.answers):
        return True
    return bool(q.context) and norm(q.context) in t


def metrics(rels: Sequence[Sequence[bool]], k: int) -> dict:
    """recall@1, recall@k, MRR and nDCG@k of per-question relevance lists over their first `k` hits."""
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
                       progress: bool = True, budget: int | None = None, fill_hits: int = 50) -> dict:
    """Search `kb` for each question: retrieval metrics, context scores within the answer budget, per question."""
    from tqdm.auto import tqdm

    from serve.chain import clip_context

    budget = kb.settings.answer.max_context_chars if budget is None else budget
    n_llm = kb.settings.answer.k
    rels, per_q, ctx = [], [], []
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(questions), batch), desc="eval retrieval", disable=not progress, unit="batch"):
        qs = questions[s : s + batch]
        for q, found in zip(qs, kb.search_many([q.question for q in qs], max(k, fill_hits))):
            hits = found[:k]
            r = [relevant(h.text, q) for h in hits]
            rels.append(r)
            row = {"id": q.id, "question": q.question, "rank": next((i + 1 for i, x in enumerate(r) if x), None)}
            if q.context:
                doc = q.meta.get("doc")
                same = [doc is None or h.source == doc or h.source.endswith("/" + doc) for h in found]
                cut_texts = clip_context(found, budget)
                top = score_texts([h.text for h in hits], q.context, q.answers, same[:k])
                cut = score_texts(cut_texts, q.context, q.answers, same)
                llm = score_texts(cut_texts[:n_llm], q.context, q.answers, same[:n_llm])
                row.update(strict=top.answer_in, precision=round(top.precision, 4), chars=top.chars,
                           answer_in_budget=cut.answer_in, precision_budget=round(cut.precision, 4),
                           chars_in_budget=cut.chars, answer_to_llm=llm.answer_in, chars_to_llm=llm.chars)
                ctx.append(row)
            per_q.append(row)
    seconds = time.perf_counter() - t0
    out = {k_: round(v, 4) if isinstance(v, float) else v for k_, v in metrics(rels, k).items()}
    mean = lambda key: round(sum(float(r[key]) for r in ctx) / len(ctx), 4) if ctx else None  # noqa: E731
    out.update({f"recall@{k}_strict": mean("strict"), f"context_precision@{k}": mean("precision"),
                f"chars@{k}": mean("chars"), "budget": budget, "llm_hits": n_llm,
                "answer_in_budget": mean("answer_in_budget"),
                "context_precision_budget": mean("precision_budget"), "chars_in_budget": mean("chars_in_budget"),
                "answer_to_llm": mean("answer_to_llm"), "chars_to_llm": mean("chars_to_llm"), "fill_hits": fill_hits,
                "n_with_context": len(ctx)})
    out["k"] = k
    out["kb"] = kb.name
    out["queries_per_s"] = round(len(questions) / seconds, 2)
    out["recall_curve"] = {str(i): round(sum(any(r[:i]) for r in rels) / len(rels), 4) for i in range(1, k + 1)}
    out["per_question"] = per_q
    return out


def write_report(result: dict, path: str) -> None:
    """Write the HTML report (summary, recall by k, questions not retrieved) and its JSON."""
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
