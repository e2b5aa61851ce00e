"""The ablation's table (Markdown, for the README) and its HTML report with plots."""

from __future__ import annotations

from pathlib import Path

from eval.report import figure_png, half_up, html_table, img, write_html

COLUMNS = [("recall@1", "R@1"), ("recall@{k}", "R@{k}"), ("recall@{k}_strict", "R@{k} strict"),
           ("mrr", "MRR"), ("context_precision@{k}", "ctx precision@{k}"), ("chars@{k}", "chars@{k}"),
           ("answer_in_budget", "answer in 1,000 chars"), ("context_precision_budget", "precision in 1,000 chars"),
           ("answer_to_llm", "answer to LLM"), ("chars_to_llm", "chars to LLM")]


def _cols(k: int, budget: int = 1000) -> list[tuple[str, str]]:
    return [(key.format(k=k), head.format(k=k).replace("1,000", f"{budget:,}")) for key, head in COLUMNS]


def _vs(row: dict) -> str:
    v = row.get("vs_reference", {}).get("answer_in_budget")
    return "-" if not v or row["factor"] == "reference" else f"+{v['gained']} / -{v['lost']}"


PER_QUESTION = {"recall@{k}_strict": "strict", "context_precision@{k}": "precision", "chars@{k}": "chars",
                "answer_in_budget": "answer_in_budget", "context_precision_budget": "precision_budget",
                "chars_in_budget": "chars_in_budget", "answer_to_llm": "answer_to_llm", "chars_to_llm": "chars_to_llm"}


def exact(row: dict, key: str, k: int) -> float:
    """A row's metric recomputed from its per-question rows (the stored means are rounded to four
    places, and rounding them again to three can be off by one in the last place)."""
    qs = row.get("per_question") or []
    ranks = [q.get("rank") for q in qs]
    per_q = {name.format(k=k): field for name, field in PER_QUESTION.items()}
    if qs and key in per_q:
        vals = [float(q[per_q[key]]) for q in qs if per_q[key] in q]
        return sum(vals) / len(vals) if vals else row[key]
    if qs and key == "recall@1":
        return sum(r == 1 for r in ranks) / len(ranks)
    if qs and key == f"recall@{k}":
        return sum(r is not None and r <= k for r in ranks) / len(ranks)
    if qs and key == "mrr":
        return sum(1 / r for r in ranks if r) / len(ranks)
    return row[key]


def _fmt(value: float, key: str) -> str:
    return half_up(value, 0 if key.startswith("chars") else 3)


def markdown(result: dict) -> str:
    """One table: a block of rows per corpus; the last column pairs each row with the reference on
    `answer_in_budget` (questions gained / lost)."""
    k = result["k"]
    cols = _cols(k, result["rows"][0]["budget"])
    head = ["corpus", "row", "chunks (mean chars)"] + [h for _, h in cols] + ["vs reference (answer in budget)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        b = r["build"]
        cells = [r["corpus"], r["row"], f"{b['chunks']:,} ({b['mean_chunk_chars']:.0f})"]
        cells += [_fmt(exact(r, key, k), key) for key, _ in cols]
        lines.append("| " + " | ".join(cells + [_vs(r)]) + " |")
    return "\n".join(lines)


def _plot(result: dict, corpus: str, keys: list[tuple[str, str]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in result["rows"] if r["corpus"] == corpus]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    x = np.arange(len(rows))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        ax.bar(x + i * width, [r[key] for r in rows], width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, [r["row"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(keys))
    ax.set_title(f"{corpus}: n={rows[0]['n']} questions")
    return img(figure_png(fig))


def write_png(result: dict, path: str) -> None:
    """One figure for the README: per corpus, each row's answer within the character budget and
    strict recall@k, the reference's level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = result["k"]
    corpora = list(result["corpora"])
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), sharey=True, squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        rows = [r for r in result["rows"] if r["corpus"] == corpus]
        y = list(range(len(rows)))[::-1]
        ax.barh([v + 0.2 for v in y], [r["answer_in_budget"] for r in rows], 0.4,
                label=f"answer in {rows[0]['budget']:,} chars")
        ax.barh([v - 0.2 for v in y], [r[f"recall@{k}_strict"] for r in rows], 0.4, label=f"strict recall@{k}")
        ax.axvline(rows[0]["answer_in_budget"], color="k", ls="--", lw=0.8)
        ax.set_yticks(y, [r["row"] for r in rows], fontsize=8)
        ax.set_xlim(0.5, 1.0)
        ax.set_title(f"{corpus} (n={rows[0]['n']})")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, path: str) -> None:
    """Write the HTML report (corpora, then a table and a plot per corpus), its JSON and a PNG beside it."""
    k = result["k"]
    keys = [(f"recall@{k}", f"recall@{k}"), (f"recall@{k}_strict", f"recall@{k} strict"),
            (f"context_precision@{k}", f"context precision@{k}"), ("answer_in_budget", "answer in budget")]
    corpora = [{"corpus": c, **{x: v for x, v in d.items() if x not in ("doc_chars", "skipped")}}
               for c, d in result["corpora"].items()]
    sections = [("Corpora", html_table(corpora))]
    budget = result["rows"][0]["budget"] if result["rows"] else 1000
    for corpus in result["corpora"]:
        rows = [{"row": r["row"], "chunks": r["build"]["chunks"], "mean chunk chars": r["build"]["mean_chunk_chars"],
                 **{h: r[key] for key, h in _cols(k, budget)}, "vs reference": _vs(r), "queries/s": r["queries_per_s"]}
                for r in result["rows"] if r["corpus"] == corpus]
        sections += [(f"{corpus}: table", html_table(rows)), (f"{corpus}: plot", _plot(result, corpus, keys))]
    payload = {**result, "rows": [{x: v for x, v in r.items()} for r in result["rows"]]}
    write_html(path, "Retrieval ablation: one factor at a time", sections, payload)
    write_png(result, str(Path(path).with_suffix(".png")))
