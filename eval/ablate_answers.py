"""Answer-level evaluation of chosen rows of the retrieval ablation, with the configured LLM.

The same answer chain (`serve.chain.AnswerChain`, its prompt, compliance and fallbacks) on each
row's knowledge base, on one sample of questions for every row: `n_in` answerable ones (their
paragraph is in the KB) and `n_out` whose paragraph is not (refusal correctness), drawn with a
fixed seed. Scored by `eval.open` (EM/F1, faithfulness to the cited passages, citation
correctness, refusal correctness, false fallbacks).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from eval.ablate import Builds, Row, corpus, grid
from eval.data import Question, load_questions
from eval.report import data_digest
from kb.settings import load_settings

log = logging.getLogger(__name__)


def pick_best(result: dict, corpus_name: str, n: int) -> list[str]:
    """The `n` rows of `corpus_name` with the most answers inside the character budget (then
    strict recall@k, then MRR)."""
    k = result["k"]
    rows = [r for r in result["rows"] if r["corpus"] == corpus_name]
    if not rows:
        raise ValueError(f"the ablation result has no rows for corpus {corpus_name!r}")
    rows.sort(key=lambda r: (-(r["answer_in_budget"] or 0.0), -(r[f"recall@{k}_strict"] or 0.0), -r["mrr"]))
    return [r["row"] for r in rows[:n]]


def sample(questions: Sequence[Question], n_in: int, n_out: int, seed: int = 13) -> list[Question]:
    """`n_in` answerable and `n_out` unanswerable questions, each drawn at random with `seed`,
    kept in file order."""
    rng = random.Random(seed)
    inside = [q for q in questions if q.meta.get("in_kb", True)]
    outside = [q for q in questions if not q.meta.get("in_kb", True)]
    if n_in > len(inside) or n_out > len(outside):
        raise ValueError(f"asked for {n_in} answerable and {n_out} unanswerable questions; "
                         f"the corpus has {len(inside)} and {len(outside)}")
    chosen = {q.id for q in rng.sample(inside, n_in)} | {q.id for q in rng.sample(outside, n_out)}
    return [q for q in questions if q.id in chosen]


def run_answers(squad: str | Path, work: str | Path, names: Sequence[str], *, config: str | Path | None = None,
                corpus_name: str = "long", splits: tuple[str, ...] = ("kb",), n_in: int = 60, n_out: int = 20,
                seed: int = 13, progress: bool = True, say: Callable[[str], None] = log.info,
                docs_sha256: str | None = None) -> dict:
    """Each named row's answers on one question sample; rows as `eval.ablate.grid` names them.
    `docs_sha256`: the documents the rows were picked on (a saved grid's); others are an error."""
    from eval.open import evaluate_open
    from eval.report import provenance
    from retrieval.knowledge_base import KnowledgeBase
    from serve.chain import AnswerChain

    by_name: dict[str, Row] = {r.name: r for r in grid()}
    if unknown := [n for n in names if n not in by_name]:
        raise ValueError(f"unknown ablation row(s) {unknown}: use {', '.join(by_name)}")
    work = Path(work)
    base = load_settings(config)
    docs, qfile = corpus(corpus_name, squad, work, splits)
    if docs_sha256 is not None and data_digest([docs]) != docs_sha256:
        raise ValueError("the rows were picked on other documents than these (another file, splits or builder): "
                         "run the grid again")
    questions = sample(load_questions(qfile)[0], n_in, n_out, seed)
    builds = Builds(corpus_name, docs, config, base, work / "kb", progress, say)
    result: dict = {"provenance": provenance(base, [squad]), "corpus": corpus_name, "splits": list(splits),
                    "questions": {"in_kb": n_in, "not_in_kb": n_out, "seed": seed, "ids": [q.id for q in questions]},
                    "sha256": data_digest([Path(squad)]), "docs_sha256": data_digest([docs]), "rows": []}
    for name in names:
        s, kb_name, overrides = builds.settings(by_name[name])
        say(f"[{corpus_name}] {name}: answering {len(questions)} questions")
        chain = AnswerChain(s, KnowledgeBase(s, kb_name))
        res = evaluate_open(chain, questions, progress=progress)
        result["rows"].append({"row": name, "overrides": overrides, "build": builds.done[by_name[name].build], **res})
    return result


ANSWER_COLUMNS = [("exact_match", "EM"), ("f1", "F1"), ("contains_answer", "contains answer"),
                  ("context_has_answer", "context has answer"), ("citation_correct", "citation correct"),
                  ("faithfulness", "faithfulness"), ("faithful_rate", "faithful (>= 0.8)"),
                  ("false_fallback_rate", "false fallback"), ("refusal_correct", "refusal correct (not in KB)"),
                  ("latency_p50_s", "p50 s")]


def markdown(result: dict) -> str:
    """One row per configuration."""
    head = ["configuration", "answered / in KB"] + [h for _, h in ANSWER_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["row"], f"{r['answered']} / {r['n_in_kb']}"]
        cells += ["-" if r.get(key) is None else f"{r[key]:.2f}" if key == "latency_p50_s" else f"{r[key]:.3f}"
                  for key, _ in ANSWER_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(result: dict, path: str) -> None:
    """Write the HTML report (summary table and a bar plot of the answer metrics per row) and its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.report import figure_png, html_table, img, write_html

    keys = [k for k, _ in ANSWER_COLUMNS if k != "latency_p50_s"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(result["rows"]))
    for i, r in enumerate(result["rows"]):
        ax.bar(x + i * width, [r.get(k) or 0.0 for k in keys], width, label=r["row"])
    ax.set_xticks(x + 0.4 - width / 2, [h for k, h in ANSWER_COLUMNS if k != "latency_p50_s"], rotation=25,
                  ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    rows = [{"configuration": r["row"], "answered": r["answered"], **{h: r.get(k) for k, h in ANSWER_COLUMNS}}
            for r in result["rows"]]
    write_html(path, f"Answers of the best retrieval configurations ({result['corpus']})",
               [("Summary", html_table(rows)), ("Plot", img(figure_png(fig)))], result)
