"""Calibrate `compliance.min_retrieval_confidence`: when should the answer chain fall back?

On the `train` split of a SQuAD-style file (never the evaluation splits), half of the paragraphs
go into a knowledge base and the other half stay out. The questions of the first half should be
answered (a fallback there is false), those of the second half should fall back. For every
threshold the two rates are computed from the chain's own retrieval confidence; the chosen
threshold is the highest whose false-fallback rate stays within `--max-false` (the issue's 10%),
so that as many unanswerable questions as possible fall back. Then the same rates on the
evaluation splits (`kb` in the KB, `out` not), at the chosen threshold.

    KB_MODELS__DIR=models python -m bench.confidence ../shared/data/cmrc2018/cmrc2018_trial.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.common import write_result

THRESHOLDS = [round(0.02 * i, 2) for i in range(51)]


def build_kb(settings, name: str, paragraphs, folder: Path):
    from retrieval.knowledge_base import KnowledgeBase

    folder.mkdir(parents=True, exist_ok=True)
    for p in paragraphs:
        (folder / f"{p.index:05d}.txt").write_text(f"{p.title}\n\n{p.context}\n", encoding="utf-8")
    kb = KnowledgeBase(settings, name, create=True)
    report = kb.add_paths([folder], progress=False)
    if not report["ingested"]:
        raise SystemExit(f"nothing ingested into {name}: {report['failed'][:3]}")
    return kb


def confidences(settings, kb, questions: list[str]) -> list[float]:
    """The answer chain's retrieval confidence (`AnswerChain.confidence`) for each question."""
    from serve.compliance import question_confidence

    hits = kb.search_many(questions, settings.answer.k)
    return [question_confidence(kb.embedder, q, h) for q, h in zip(questions, hits)]


def rates(inside: list[float], outside: list[float], t: float) -> dict:
    return {"threshold": t,
            "false_fallback_rate": round(sum(c < t for c in inside) / max(1, len(inside)), 4),
            "unanswerable_fallback_rate": round(sum(c < t for c in outside) / max(1, len(outside)), 4)}


def questions_of(paragraphs, limit: int) -> list[str]:
    return [q.question for p in paragraphs for q in p.questions][:limit]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("squad")
    ap.add_argument("--limit", type=int, default=200, help="questions per side")
    ap.add_argument("--max-false", type=float, default=0.10)
    ap.add_argument("--name", default="confidence_cmrc")
    args = ap.parse_args(argv)

    from eval.data import cmrc_split
    from kb.settings import load_settings

    home = Path(tempfile.mkdtemp(prefix="kb-confidence-"))
    os.environ["KB_HOME"] = str(home)
    settings = load_settings()
    groups = cmrc_split(args.squad)
    train = groups["train"]
    cal_in, cal_out = train[0::2], train[1::2]
    kb = build_kb(settings, "calibrate", cal_in, home / "docs_cal")
    inside = confidences(settings, kb, questions_of(cal_in, args.limit))
    outside = confidences(settings, kb, questions_of(cal_out, args.limit))
    curve = [rates(inside, outside, t) for t in THRESHOLDS]
    ok = [r for r in curve if r["false_fallback_rate"] <= args.max_false]
    chosen = max(ok, key=lambda r: r["threshold"]) if ok else curve[0]

    kb_eval = build_kb(settings, "evaluate", groups["kb"], home / "docs_eval")
    eval_in = confidences(settings, kb_eval, questions_of(groups["kb"], args.limit))
    eval_out = confidences(settings, kb_eval, questions_of(groups["out"], args.limit))
    test = rates(eval_in, eval_out, chosen["threshold"])
    current = rates(eval_in, eval_out, settings.compliance.min_retrieval_confidence)
    payload = {"squad": args.squad, "embedder": settings.models.embedder,
               "null_similarity": round(kb.embedder.null_similarity(), 4),
               "calibration": {"paragraphs_in_kb": len(cal_in), "paragraphs_out": len(cal_out),
                               "questions_in": len(inside), "questions_out": len(outside),
                               "max_false_fallback": args.max_false, "chosen": chosen, "curve": curve},
               "evaluation": {"split_in_kb": "kb", "split_out": "out", "at_chosen": test,
                              "at_configured": current},
               "config": settings.model_dump(mode="json")}
    path = write_result(args.name, payload, data=(args.squad,))
    print(f"chosen threshold {chosen['threshold']}: calibration {chosen}; evaluation {test}; "
          f"configured {current} -> {path}")


if __name__ == "__main__":
    main()
