"""Precision of FAQ direct answers (serve/faq.py) on paraphrased questions; picks `faq.threshold`.

The FAQ is built from CMRC 2018 (CC BY-SA 4.0; the `kb` and `out` splits, which the shipped
reranker never saw): for every paragraph, its first `--per-paragraph` questions become FAQ entries
(question -> gold answer). Queries:
- **paraphrases** (should be answered with their entry): two rule-based rewrites of each FAQ question
  (politeness prefixes, question-word and verb synonyms, sentence-final particles). No paraphrase
  data set (LCQMC, AFQMC, BQ) is in the shared data, and these rewrites keep most of the wording:
  they are easier than real users' paraphrases, so coverage here is an upper bound;
- **near misses** (should not be answered directly): the paragraph's other questions (same topic,
  same names, a different question), and questions about other paragraphs (the `train` split).

For each query the matcher's best entry and score: a direct answer when the score reaches the
threshold; it is correct only for a paraphrase answered with its own entry. precision = correct
direct answers / direct answers; coverage = paraphrases answered correctly / paraphrases. The
threshold is chosen on the even paragraphs (the highest coverage at precision >= `--min-precision`,
0.97: a margin over the 0.95 target) and reported on the odd ones (held out), then the other way
round; the configured threshold is the higher of the two. For the embedder alone and with the
reranker.

    KB_MODELS__DIR=models python -m bench.faq ../shared/data/cmrc2018/cmrc2018_trial.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import RESULTS, write_result

PREFIXES = ("请问", "想问一下，", "我想知道", "你好，请问", "麻烦问下，")
SUFFIXES = ("", "呢")
QUESTION_WORDS = (("什么时候", "何时"), ("何时", "什么时候"), ("为什么", "为何"), ("为何", "为什么"),
                  ("是谁", "是哪位"), ("哪一年", "哪年"), ("哪年", "哪一年"), ("哪里", "什么地方"),
                  ("怎么", "如何"), ("如何", "怎样"), ("怎样", "怎么"), ("哪个", "哪一个"), ("哪些", "哪几个"),
                  ("是多少", "有多少"), ("是什么", "是啥"), ("什么", "啥"))
QUESTION_WORDS_B = (("什么时候", "什么时间"), ("何时", "什么时间"), ("为什么", "因为什么"), ("是谁", "是什么人"),
                    ("哪一年", "什么年份"), ("哪年", "什么年份"), ("哪里", "哪儿"), ("怎么", "怎样"),
                    ("如何", "怎么"), ("哪个", "哪一个"), ("是多少", "为多少"), ("是什么", "指的是什么"),
                    ("什么样", "怎样"), ("多少", "多大数目"))
OTHER_WORDS = (("被称为", "被叫作"), ("称为", "叫作"), ("位于", "坐落于"), ("主要", ""), ("属于", "归属于"),
               ("目前", "现在"), ("最早", "最先"), ("担任", "出任"), ("获得", "得到"), ("拥有", "有"),
               ("曾经", "曾"), ("一共", "总共"), ("出生", "出世"), ("建立", "创建"), ("成立", "创立"))


@dataclass
class Query:
    text: str
    kind: str
    """paraphrase | same_topic (another question of the paragraph) | other_topic."""
    paragraph: int
    target: str | None
    """The FAQ id it should be answered with (paraphrases), else None."""


def pick(options: tuple, text: str, salt: str) -> str:
    """A deterministic choice among `options` for `text`."""
    h = int(hashlib.sha1((salt + text).encode("utf-8")).hexdigest()[:8], 16)
    return options[h % len(options)]


def substitute(text: str, table: tuple[tuple[str, str], ...], limit: int) -> str:
    """`text` with at most `limit` of `table`'s replacements applied (each at its first place)."""
    done = 0
    for old, new in table:
        if done >= limit:
            break
        if old in text:
            text = text.replace(old, new, 1)
            done += 1
    return text


def paraphrases(question: str) -> list[str]:
    """Two rule-based rewrites of a Chinese question (they always differ from it)."""
    core = question.rstrip("？?。. ")
    one = pick(PREFIXES, core, "a") + substitute(core, QUESTION_WORDS, 1) + "？"
    two_core = substitute(substitute(core, OTHER_WORDS, 2), QUESTION_WORDS_B, 1)
    two = pick(PREFIXES[1:], core, "b") + two_core + pick(SUFFIXES, core, "c") + "？"
    return [one, two]


def build(squad: str, per_paragraph: int, other_topic: int):
    """The FAQ entries and the queries (see the module docstring)."""
    from eval.data import cmrc_split
    from serve.faq import FaqEntry, faq_id

    groups = cmrc_split(squad)
    entries, queries, seen = [], [], set()
    for p in groups["kb"] + groups["out"]:
        for i, q in enumerate(p.questions):
            fid = faq_id(q.question)
            if i < per_paragraph and fid not in seen:
                seen.add(fid)
                entries.append(FaqEntry(fid, q.question, q.answers[0]))
                queries += [Query(t, "paraphrase", p.index, fid) for t in paraphrases(q.question)]
            elif fid not in seen:
                queries.append(Query(q.question, "same_topic", p.index, None))
    others = [q for p in groups["train"] for q in p.questions][:other_topic]
    queries += [Query(q.question, "other_topic", q.meta["paragraph"], None) for q in others]
    return entries, queries


def best_matches(matcher, queries: list[Query]) -> tuple[list[str | None], np.ndarray, float]:
    """Each query's best entry id and score (`FaqMatcher.scored_many`), and the seconds per query."""
    t0 = time.perf_counter()
    tops = matcher.scored_many([q.text for q in queries])
    ids = [top[0].entry.faq_id if top else None for top in tops]
    scores = np.asarray([top[0].score if top else -1.0 for top in tops])
    return ids, scores, (time.perf_counter() - t0) / max(1, len(queries))


def curve(queries: list[Query], ids: list, scores: np.ndarray, thresholds: list[float]) -> list[dict]:
    """Precision, coverage and false direct answers per kind at each threshold."""
    pos = np.array([q.kind == "paraphrase" for q in queries])
    right = np.array([q.target is not None and q.target == i for q, i in zip(queries, ids)])
    kinds = sorted({q.kind for q in queries} - {"paraphrase"})
    out = []
    for t in thresholds:
        direct = scores >= t
        n_direct, n_right = int(direct.sum()), int((direct & right).sum())
        row = {"threshold": t, "direct": n_direct, "correct": n_right,
               "precision": round(n_right / n_direct, 4) if n_direct else 1.0,
               "coverage": round(n_right / max(1, int(pos.sum())), 4),
               "wrong_entry": int((direct & pos & ~right).sum())}
        for k in kinds:
            sel = np.array([q.kind == k for q in queries])
            row[f"false_direct_{k}"] = round(float((direct & sel).sum()) / max(1, int(sel.sum())), 4)
        out.append(row)
    return out


def choose(rows: list[dict], min_precision: float) -> dict | None:
    ok = [r for r in rows if r["precision"] >= min_precision and r["direct"] > 0]
    return max(ok, key=lambda r: (r["coverage"], -r["threshold"])) if ok else None


def evaluate(name: str, matcher, queries: list[Query], grid: list[float], min_precision: float) -> dict:
    """Two folds: choose the threshold on the even paragraphs and report it on the odd ones, and the
    other way round; the threshold is the higher of the two choices (the safer one)."""
    ids, scores, s_per_q = best_matches(matcher, queries)
    halves = [[i for i, q in enumerate(queries) if q.paragraph % 2 == r] for r in (0, 1)]
    sub = lambda idx: ([queries[i] for i in idx], [ids[i] for i in idx], scores[idx])  # noqa: E731
    folds = []
    for calib, test in (halves, halves[::-1]):
        chosen = choose(curve(*sub(calib), grid), min_precision)
        held_out = curve(*sub(test), [chosen["threshold"]])[0] if chosen else None
        folds.append({"calibration": chosen, "held_out": held_out})
    picks = [f["calibration"]["threshold"] for f in folds if f["calibration"]]
    threshold = max(picks) if len(picks) == len(folds) else None
    at = curve(queries, ids, scores, [threshold])[0] if threshold is not None else None
    held_at = [curve(*sub(h), [threshold])[0] for h in halves] if threshold is not None else None
    return {"scorer": name, "threshold": threshold, "at_threshold_all": at, "at_threshold_halves": held_at,
            "folds": folds, "seconds_per_query_batched": round(s_per_q, 4),
            "queries": {"even_paragraphs": len(halves[0]), "odd_paragraphs": len(halves[1])},
            "curve_all": curve(queries, ids, scores, grid)}


SWEPT = {"threshold", "rerank_threshold"}
"""faq.* keys this benchmark sweeps instead of reading: left out of the recorded config."""


def chosen_config(results: list[dict]) -> dict:
    """The faq.* values this run chose (the embedder's threshold, the reranker's when measured)."""
    keys = ("faq.threshold", "faq.rerank_threshold")
    return {k: r["threshold"] for k, r in zip(keys, results)}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        xs = [c["threshold"] for c in r["curve_all"]]
        ax.plot(xs, [c["precision"] for c in r["curve_all"]], label="precision")
        ax.plot(xs, [c["coverage"] for c in r["curve_all"]], label="coverage (recall)")
        if r["threshold"] is not None:
            ax.axvline(r["threshold"], color="grey", linestyle="--", label=f"chosen {r['threshold']}")
        ax.axhline(0.95, color="red", linewidth=0.5)
        ax.set_title(f"FAQ direct answers: {r['scorer']}")
        ax.set_xlabel("threshold")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("squad")
    ap.add_argument("--per-paragraph", type=int, default=2, help="FAQ entries from each paragraph's questions")
    ap.add_argument("--other-topic", type=int, default=200, help="near misses about other paragraphs")
    ap.add_argument("--reranker", default="model:rerank-e5", help="'' to skip the reranker rows")
    ap.add_argument("--min-precision", type=float, default=0.97,
                    help="precision the chosen threshold keeps on the calibration half (the target is 0.95 "
                         "on unseen questions: 0.97 leaves a margin)")
    ap.add_argument("--name", default="faq")
    args = ap.parse_args(argv)

    from kb.settings import load_settings
    from retrieval.embedder import Embedder
    from retrieval.search import Reranker
    from serve.faq import FaqMatcher

    os.environ.setdefault("KB_FORCE_CPU", "1")
    settings = load_settings(None, **{"models.device": "cpu"})
    entries, queries = build(args.squad, args.per_paragraph, args.other_topic)
    emb = Embedder(settings.models.embedder, "cpu", settings.retrieval.embed_batch_size)
    t0 = time.perf_counter()
    base = FaqMatcher(settings.faq, emb, entries)
    embed_s = time.perf_counter() - t0
    results = [evaluate("embedder", base, queries, [round(0.8 + 0.0025 * i, 4) for i in range(81)],
                        args.min_precision)]
    if args.reranker:
        rr = Reranker(args.reranker, "cpu")
        with_rr = FaqMatcher(settings.faq, emb, entries, base.vectors, rr)
        grid = [round(0.01 * i, 2) for i in range(90)] + [round(0.9 + 0.001 * i, 3) for i in range(101)]
        results.append(evaluate(f"embedder + {args.reranker}", with_rr, queries, grid, args.min_precision))
    png = RESULTS / f"{args.name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, png)
    counts = {k: sum(q.kind == k for q in queries) for k in ("paraphrase", "same_topic", "other_topic")}
    payload = {"squad": args.squad, "embedder": settings.models.embedder, "reranker": args.reranker or None,
               "faq_entries": len(entries), "queries": counts, "min_precision": args.min_precision,
               "paraphrases": "rule-based rewrites (prefixes, question-word/verb synonyms, particles): "
                              "easier than real paraphrases; no paraphrase data set is in the shared data",
               "examples": [{"faq": e.question, "paraphrases": paraphrases(e.question)} for e in entries[:5]],
               "seconds_embedding_faq": round(embed_s, 2), "loadavg": list(os.getloadavg()),
               "results": results, "plot": png.name, "chosen": chosen_config(results),
               "config": {"faq": settings.faq.model_dump(mode="json", exclude=SWEPT),
                          "models": settings.models.model_dump(mode="json")}}
    path = write_result(args.name, payload, data=(args.squad,))
    for r in results:
        print(f"{r['scorer']}: threshold {r['threshold']}; all queries {r['at_threshold_all']}; "
              f"folds {r['folds']}; {r['seconds_per_query_batched'] * 1000:.1f} ms/query (batched)")
    print(f"-> {path}, {png}")


if __name__ == "__main__":
    main()
