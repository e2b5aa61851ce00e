"""Open-ended evaluation: run the full answer chain on questions with gold answers.

Per question: exact match, token F1 and ROUGE-L (CJK characters as tokens), whether the gold
answer is inside the reply, refusal and fallback, whether the retrieved context held a gold
answer at all, the passages the reply cites, latency; optionally an LLM judge's 1-5 grade scaled
to 0-1. Answer quality (EM, F1, ...) is averaged over the questions whose passage is in the KB
(`in_kb`, true unless the question file says otherwise).

Answer-level metrics (an *answered* reply is an in-KB question's reply that did not fall back;
`[n]` cites `sources[n-1]`, the n-th passage of the chain's prompt, as `serve.chain` numbers them, judged
as the LLM saw it: the passages cut to `answer.max_context_chars` in all):

- `faithfulness`: mean over answered replies of the share of the answer's content units found in
  the text of the passages it cites. Units (`content_units`): Chinese character bigrams within a
  clause (a lone Chinese character counts as itself) and lower-cased Latin words and numbers;
  citation marks, whitespace and punctuation are removed, and a citation mark or punctuation ends
  a clause. Each occurrence counts. An answered reply that cites nothing scores 0. Unlike
  compliance's grounding check (terms of the answer found in *any* retrieved passage, which decides
  the fallback), this looks only at the passages the reply names, so it can be low when nothing
  falls back. Extractive answers (no LLM) copy sentences of the passages they cite, so they
  score 1 by construction: the measure is about what a generating model writes.
- `faithful_rate`: the share of answered replies with faithfulness >= 0.8 (`FAITHFUL`). (The old
  `supported` re-ran compliance's grounding check, so it equalled 1 - fallback; it is gone.)
- `citation_rate`: the share of answered replies that cite at least one passage.
- `citation_correct`: over answered replies that cite at least one passage, the share whose cited
  passages contain a gold answer (`eval.textmetrics.contains_answer` normalisation).
- `refusal_correct`: over questions not in the KB (`in_kb` false), the share that fell back (the
  chain turns the model's refusals into fallbacks too); None without such questions. Older result
  files call it `unanswerable_fallback_rate`.
- `false_fallback_rate`: the share of in-KB questions that fell back; `fallback_rate` is over every
  question asked.

A mean over no rows is 0 (`answered` says how many replies the answer-level rates stand on), except
`refusal_correct`, which is None. Per question, `faithfulness` is
None for a reply that fell back and `citation_correct` None for one that fell back or cites nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from eval.data import Question
from eval.retrieval import relevant
from eval.textmetrics import contains_answer, exact_match, f1, rouge_l, tokens

CITATION = re.compile(r"\[\d+(?:\s*[,，]\s*\d+)*\]")
FAITHFUL = 0.8
_CLAUSE_END = re.compile(r"[^\w\s]+")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def cited(answer: str, n_sources: int) -> list[int]:
    """The passage numbers (1-based, sorted, each once) that `answer` cites as [n] or [n, m],
    keeping only those that name one of the `n_sources` passages."""
    nums = {int(n) for m in CITATION.finditer(answer) for n in re.findall(r"\d+", m.group(0))}
    return sorted(n for n in nums if 1 <= n <= n_sources)


def content_units(text: str) -> list[str]:
    """Units for faithfulness: Chinese character bigrams within a clause (a lone Chinese character
    as itself) and lower-cased Latin words and numbers. Citation marks and punctuation are removed
    and end a clause (no bigram spans one); whitespace is removed and does not."""
    return [u for piece in _CLAUSE_END.split(CITATION.sub("。", text)) for u in _clause_units(piece)]


def _clause_units(text: str) -> list[str]:
    """`content_units` of one clause."""
    chars: list[str] = []
    out: list[str] = []
    for t in [*tokens(text), ""]:
        if t and _CJK.fullmatch(t):
            chars.append(t)
            continue
        out += [a + b for a, b in zip(chars, chars[1:])] if len(chars) > 1 else chars
        chars = []
        if t:
            out.append(t)
    return out


def faithfulness(answer: str, passages: Sequence[str]) -> float:
    """Share of `answer`'s content units found in `passages` (0 when there are none of either)."""
    units = content_units(answer)
    if not units or not passages:
        return 0.0
    known = {u for p in passages for u in content_units(p)}
    return sum(u in known for u in units) / len(units)


def answer_row(q: Question, r: dict, refused: bool, max_chars: int | None = None) -> dict:
    """One question's scores from the chain's result `r` (see the module docstring); passages are
    judged as the LLM saw them: cut to `max_chars` in all (`answer.max_context_chars`)."""
    from serve.chain import clip_context

    seen = [s["text"] for s in r["sources"]]
    seen = clip_context(seen, max_chars) if max_chars is not None else seen
    nums = [] if r["fallback"] else cited(r["answer"], len(seen))
    texts = [seen[n - 1] for n in nums]
    faith = None if r["fallback"] else round(faithfulness(r["answer"], texts), 4)
    return {"id": q.id, "question": q.question, "gold": q.answers[0], "answer": r["answer"],
            "exact_match": exact_match(r["answer"], q.answers), "f1": f1(r["answer"], q.answers),
            "rouge_l": rouge_l(r["answer"], q.answers), "contains_answer": contains_answer(r["answer"], q.answers),
            "faithfulness": faith, "cited": nums,
            "citation_correct": float(any(contains_answer(t, q.answers) for t in texts)) if nums else None,
            "context_has_answer": float(any(relevant(t, q) for t in seen if t)),
            "refused": float(refused), "fallback": float(r["fallback"]), "reason": r["reason"] or "",
            "cites": float(bool(nums)), "in_kb": bool(q.meta.get("in_kb", True)), "seconds": r["seconds"]}


def evaluate_open(chain, questions: Sequence[Question], *, judge=None, progress: bool = True) -> dict:
    """Ask `chain` each question and summarize the per-question answer scores (and judge grades, given a judge)."""
    from tqdm.auto import tqdm

    rows = []
    for q in tqdm(questions, desc="eval open", unit="q", disable=not progress):
        r = chain.ask(q.question)
        row = answer_row(q, r.to_json(), chain.is_refusal(r.standalone_question, r.draft),
                         chain.settings.answer.max_context_chars)
        if judge is not None:
            row["judge"] = judge.grade(q.question, q.answers, r.answer)
        rows.append(row)
    return summarize(rows, chain)


def summarize(rows: list[dict], chain=None) -> dict:
    """Answer quality over the questions whose passage is in the KB; fallbacks counted apart for
    those (false fallbacks) and for questions about documents not in the KB (correct ones);
    `fallback_rate` is over every question asked. Definitions: the module docstring."""
    n = len(rows)
    mean = lambda key, rs: round(float(np.mean([r[key] for r in rs])), 4) if rs else 0.0  # noqa: E731
    inside = [r for r in rows if r.get("in_kb", True)]
    outside = [r for r in rows if not r.get("in_kb", True)]
    answered = [r for r in inside if not r["fallback"]]
    citing = [r for r in answered if r["cites"]]
    held = [r for r in inside if r["context_has_answer"]]
    faithful = round(float(np.mean([r["faithfulness"] >= FAITHFUL for r in answered])), 4) if answered else 0.0
    lat = np.array([r["seconds"] for r in rows]) if rows else np.zeros(1)
    out = {"n": n, "n_in_kb": len(inside), "n_not_in_kb": len(outside),
           "exact_match": mean("exact_match", inside), "f1": mean("f1", inside), "rouge_l": mean("rouge_l", inside),
           "contains_answer": mean("contains_answer", inside),
           "faithfulness": mean("faithfulness", answered), "faithful_rate": faithful,
           "context_has_answer": mean("context_has_answer", inside), "refusal_rate": mean("refused", inside),
           "fallback_rate": mean("fallback", rows), "answered": len(answered),
           "citation_rate": mean("cites", answered), "citation_correct": mean("citation_correct", citing),
           "f1_answered": mean("f1", answered),
           "false_fallback_rate": mean("fallback", inside),
           "false_fallback_when_retrieved": mean("fallback", held),
           "refusal_correct": mean("fallback", outside) if outside else None,
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
    """Write the HTML report (summary, score distributions, fallback reasons, worst answers) and its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.report import figure_png, html_table, img, write_html

    rows = result["per_question"]
    answered = [r for r in rows if r.get("in_kb", True) and not r["fallback"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
    axes[0].hist([r["f1"] for r in rows if r.get("in_kb", True)], bins=20, range=(0, 1), color="#4a7ab5")
    axes[0].set_xlabel("F1 per question")
    axes[0].set_ylabel("questions")
    axes[1].hist([r["faithfulness"] for r in answered], bins=20, range=(0, 1), color="#b58a4a")
    axes[1].axvline(FAITHFUL, color="#333", linestyle="--")
    axes[1].set_xlabel("faithfulness per answered reply")
    axes[2].hist([r["seconds"] for r in rows], bins=30, color="#5a9e6f")
    axes[2].set_xlabel("latency per question (s)")
    fig.suptitle(f"{result.get('kb', '')}: n={result['n']}")
    rates = ["exact_match", "f1", "rouge_l", "contains_answer", "faithfulness", "faithful_rate", "context_has_answer",
             "citation_rate", "citation_correct", "refusal_rate", "false_fallback_rate",
             "false_fallback_when_retrieved"]
    rates += [k for k in ("unanswerable_fallback_rate", "refusal_correct", "judge") if result.get(k) is not None]
    fig2, ax = plt.subplots(figsize=(9, 3))
    ax.bar(rates, [result[k] for k in rates], color="#4a7ab5")
    ax.set_ylim(0, 1)
    ax.tick_params(axis="x", rotation=30)
    reasons: dict[str, int] = {}
    for r in rows:
        if r["fallback"]:
            key = r["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    worst = sorted(rows, key=lambda r: (r["f1"], -r["seconds"]))[:30]
    unfaithful = sorted(answered, key=lambda r: r["faithfulness"])[:30]
    summary = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
    write_html(path, "Open-ended answer evaluation",
               [("Summary", html_table([summary])), ("Scores", img(figure_png(fig2))),
                ("Distributions", img(figure_png(fig))),
                ("Fallback reasons", html_table([{"reason": k, "questions": v} for k, v in
                                                 sorted(reasons.items(), key=lambda x: -x[1])])),
                ("Lowest F1 (first 30)", html_table(worst, ["id", "question", "gold", "answer", "f1", "reason"])),
                ("Least faithful answered replies (first 30)",
                 html_table(unfaithful, ["id", "question", "gold", "answer", "cited", "faithfulness",
                                         "citation_correct"])),
                ("Skipped rows", html_table([{"problem": p} for p in result.get("skipped_rows", [])]))], result)
