"""`--compare RUN_A RUN_B`: one evaluation on two configurations, side by side with differences.

A RUN is a result JSON saved by an earlier `--report`/`--json` run, or a config YAML to run now,
optionally with `@KB` to use another knowledge base (`configs/baseline_fixed.yaml@cmrc_baseline`,
or `@cmrc_baseline` with the current config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SKIP = {"k", "chance", "seconds", "questions_per_s", "queries_per_s"}


@dataclass
class RunSpec:
    label: str
    result_json: Path | None = None
    config: str | None = None
    kb: str | None = None


def parse_run(spec: str) -> RunSpec:
    """A RUN argument (RESULT.json, CONFIG.yaml[@KB] or @KB) as a RunSpec; a missing file raises FileNotFoundError."""
    path, _, kb = spec.partition("@")
    if path.endswith(".json"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such result file: {path}")
        return RunSpec(spec, result_json=Path(path))
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"no such config file: {path} (a RUN is RESULT.json or CONFIG.yaml[@KB] or @KB)")
    return RunSpec(spec, config=path or None, kb=kb or None)


def load_result(path: Path) -> dict:
    """The result stored in a result file (its `result` entry where it has one)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("result", data) if isinstance(data, dict) else data


def _numbers(r: dict) -> dict[str, float]:
    return {k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool) and k not in SKIP}


def compare(a: dict, b: dict, labels: tuple[str, str]) -> dict:
    """Metrics of both runs with B - A, per-subject rows where both have them, and paired counts
    on the questions both answered (which run got which question right)."""
    na, nb = _numbers(a), _numbers(b)
    rows = [{"metric": k, labels[0]: na[k], labels[1]: nb[k], "diff": round(nb[k] - na[k], 4)}
            for k in na if k in nb]
    out: dict = {"labels": list(labels), "metrics": rows}
    if "per_subject" in a and "per_subject" in b:
        out["per_subject"] = [{"subject": s, labels[0]: a["per_subject"][s]["accuracy"],
                               labels[1]: b["per_subject"][s]["accuracy"],
                               "diff": round(b["per_subject"][s]["accuracy"] - a["per_subject"][s]["accuracy"], 4)}
                              for s in a["per_subject"] if s in b["per_subject"]]
    pa, pb = _paired(a), _paired(b)
    common = [k for k in pa if k in pb]
    if common:
        out["paired"] = {"questions": len(common),
                         "both": sum(pa[k] and pb[k] for k in common),
                         f"only {labels[0]}": sum(pa[k] and not pb[k] for k in common),
                         f"only {labels[1]}": sum(pb[k] and not pa[k] for k in common),
                         "neither": sum(not pa[k] and not pb[k] for k in common)}
    out["runs"] = {labels[0]: a, labels[1]: b}
    return out


def _paired(r: dict) -> dict:
    """Question key -> right or not (choice: correct; retrieval: found; open: F1 >= 0.5)."""
    out = {}
    for q in r.get("per_question", []):
        if "correct" in q:
            out[(q["subject"], q["line"])] = bool(q["correct"])
        elif "rank" in q:
            out[q["id"]] = q["rank"] is not None
        elif "f1" in q:
            out[q["id"]] = q["f1"] >= 0.5
    return out


def write_report(cmp: dict, path: str, title: str) -> None:
    """Write the HTML comparison (metrics with differences, plots side by side, per subject, paired) and its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.report import figure_png, html_table, img, write_html

    la, lb = cmp["labels"]
    unit = [r for r in cmp["metrics"] if 0 <= r[la] <= 1 and 0 <= r[lb] <= 1 and r["metric"] != "n"]
    sections = [("Metrics (diff = B - A)", html_table(cmp["metrics"], ["metric", la, lb, "diff"]))]
    if unit:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(unit)), 3.5))
        x = np.arange(len(unit))
        ax.bar(x - 0.2, [r[la] for r in unit], 0.4, label=la)
        ax.bar(x + 0.2, [r[lb] for r in unit], 0.4, label=lb)
        ax.set_xticks(x, [r["metric"] for r in unit], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.legend()
        sections.append(("Side by side", img(figure_png(fig))))
    if cmp.get("per_subject"):
        ps = cmp["per_subject"]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(ps) + 1.5))
        y = np.arange(len(ps))
        ax.barh(y - 0.2, [r[la] for r in ps], 0.4, label=la)
        ax.barh(y + 0.2, [r[lb] for r in ps], 0.4, label=lb)
        ax.set_yticks(y, [r["subject"] for r in ps])
        ax.set_xlim(0, 1)
        ax.legend()
        sections.append(("Per subject", html_table(ps, ["subject", la, lb, "diff"]) + img(figure_png(fig))))
    if cmp.get("paired"):
        sections.append(("Paired questions", html_table([cmp["paired"]])))
    write_html(path, title, sections, cmp)
