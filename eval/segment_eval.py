"""`kb eval segmentation`: the NSP cross-encoder, the pair head and the fixed-size splitter on
multi-topic documents made from CMRC 2018's held-out paragraphs (eval/segmentation.py).

Only the train split tunes anything: each NSP method's threshold is the one with the lowest
WindowDiff on documents made the same way from train-split paragraphs, and the fixed splitter's
size is the one whose mean chunk length there matches the cross-encoder chunker's, so the fixed
baseline cuts as often. The pair head is trained on the train split's text (the same pairs the
shipped cross-encoder was trained on: `nsp_training_docs`). The held-out documents are scored
at those settings and at the configured `chunking.threshold`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from eval.data import cmrc_split
from eval.segmentation import (
    adjacent_pairs,
    char_bounds,
    fixed_cuts,
    make_documents,
    match_fixed_size,
    nsp_cuts,
    score_chars,
    score_units,
    tune_threshold,
)

log = logging.getLogger(__name__)

HARD_SHARE = 0.3
"""Share of hard negatives in the NSP training pairs (the shipped cross-encoder's recipe)."""


def nsp_training_docs(squad: str | Path, samples: str | Path | None, settings,
                      neighbours: int = 5) -> tuple[list[list[list[str]]], dict[int, list[int]]]:
    """Documents → sections → units of the train split's paragraphs (one section each) and of
    the sample documents (their titled sections), and each CMRC paragraph's most lexically
    similar other paragraphs (hard negatives for `ingest.nsp.build_pairs`)."""
    from ingest.chunking import to_units
    from ingest.text import terms
    from ingest.types import Block, ParsedDocument

    paras = cmrc_split(squad)["train"]
    docs = [[[u.text for u in to_units(ParsedDocument("", "", "", "", [Block(p.context)]))]] for p in paras]
    bags = [terms(p.context) for p in paras]
    near: dict[int, list[int]] = {}
    for i, a in enumerate(bags):
        sims = [(len(a & b) / max(1, len(a | b)), j) for j, b in enumerate(bags) if j != i]
        near[i] = [j for _, j in sorted(sims, reverse=True)[:neighbours]]
    if samples:
        docs += sample_sections(Path(samples), settings)
    return docs, near


def sample_sections(folder: Path, settings) -> list[list[list[str]]]:
    """The sample documents' sentences by titled section (unreadable files are skipped)."""
    from ingest.chunking import to_units
    from ingest.loaders import ParseError
    from ingest.pipeline import items_from_paths, parse_item, sections_of

    items, _ = items_from_paths([folder])
    out = []
    for it in items:
        try:
            doc = parse_item(it, settings)
        except (ParseError, OSError, ValueError, RuntimeError):
            continue
        secs = sections_of(to_units(doc, settings.chunking.max_chars))
        if secs:
            out.append(secs)
    return out


def train_pair_head_on_split(settings, squad: str | Path, samples: str | Path | None, out: Path,
                             progress: bool = True) -> dict:
    """Train the NSP pair head on pairs from the train split (and the samples) into `out`; its report."""
    from ingest.nsp import build_pairs, train_pair_head
    from kb.models import resolve_model

    t = settings.nsp_train
    docs, near = nsp_training_docs(squad, samples, settings)
    pairs = build_pairs(docs, t.max_pairs, t.far_gap, t.seed, hard=HARD_SHARE, neighbours=near)
    return train_pair_head(pairs, resolve_model(settings.models.nsp_encoder, "nsp_encoder"), out,
                           heldout=t.heldout, seed=t.seed, device=settings.models.device, progress=progress)


def evaluate_segmentation(settings, squad: str | Path, *, n_docs: int = 60, seed: int = 13,
                          pair_head: str | Path | None = None, samples: str | Path | None = None,
                          progress: bool = True) -> dict:
    """Score the methods (see module docstring); the cross-encoder is `models.nsp`."""
    from ingest.nsp import load_scorer_from
    from kb.models import resolve_model

    if not settings.models.nsp:
        raise ValueError("models.nsp is not set: point it at the NSP cross-encoder (e.g. model:nsp-e5)")
    c = settings.chunking
    split = cmrc_split(squad)
    tune_docs = make_documents(split["train"], n_docs, seed, max_chars=c.max_chars)
    test_docs = make_documents(split["kb"] + split["out"], n_docs, seed + 1, max_chars=c.max_chars)
    scorers = {"nsp cross-encoder": load_scorer_from(resolve_model(settings.models.nsp, "nsp"),
                                                     settings.models.device, c.max_seq_len, c.batch_size)}
    head_meta = None
    with tempfile.TemporaryDirectory() as tmp:
        if pair_head is None:
            head_meta = train_pair_head_on_split(settings, squad, samples, Path(tmp) / "head", progress)
            pair_head = Path(tmp) / "head"
        scorers["nsp pair head"] = load_scorer_from(pair_head, settings.models.device)
        methods, curves = [], {}
        target = None
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            p_tune = scorer.continue_probs(adjacent_pairs(tune_docs), c.temperature)
            p_test = scorer.continue_probs(adjacent_pairs(test_docs), c.temperature)
            rate = (len(p_tune) + len(p_test)) / max(time.perf_counter() - t0, 1e-9)
            best, curves[name] = tune_threshold(tune_docs, p_tune, c)
            if target is None:
                target = next(r["mean_chunk_chars"] for r in curves[name] if r["threshold"] == best)
            for thr, source in ((best, "tuned on the train split"), (c.threshold, "chunking.threshold")):
                methods.append(_nsp_row(name, test_docs, p_test, thr, source, c, rate, scorer))
    size = match_fixed_size(tune_docs, target, c.fixed_overlap)
    unit_cuts, char_cuts, lengths = fixed_cuts(test_docs, size, c.fixed_overlap)
    methods.append({"method": "fixed (RecursiveCharacterTextSplitter)",
                    "setting": f"size {size}, overlap {c.fixed_overlap}",
                    "source": "size matched to the cross-encoder's mean chunk length on the train split",
                    **score_units(test_docs, unit_cuts), **_prefix("chars_", score_chars(test_docs, char_cuts)),
                    "chunks": len(lengths), "mean_chunk_chars": round(float(np.mean(lengths)), 1)})
    return {"squad": str(squad), "docs": len(test_docs), "tune_docs": len(tune_docs), "seed": seed,
            "units": sum(len(d.units) for d in test_docs), "true_boundaries": sum(len(d.bounds) for d in test_docs),
            "mean_segment_chars": round(float(np.mean([len(d.text) / (len(d.bounds) + 1) for d in test_docs])), 1),
            "methods": methods, "threshold_curves": curves, "pair_head": head_meta,
            "cross_encoder": str(resolve_model(settings.models.nsp, "nsp"))}


def _prefix(p: str, d: dict) -> dict:
    return {p + k: v for k, v in d.items()}


def _nsp_row(name, docs, probs, thr, source, c, rate, scorer) -> dict:
    cuts, lengths = nsp_cuts(docs, probs, thr, c)
    chars = [char_bounds(d, b) for d, b in zip(docs, cuts)]
    return {"method": name, "setting": f"threshold {thr:g}", "source": source, **score_units(docs, cuts),
            **_prefix("chars_", score_chars(docs, chars)), "chunks": len(lengths),
            "mean_chunk_chars": round(float(np.mean(lengths)), 1),
            "pairs_per_s": round(rate, 1),
            "model": str(scorer.model_dir)}


def write_report(result: dict, path: str) -> None:
    """Write the HTML report (methods on held-out documents, threshold curves) and its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.report import figure_png, html_table, img, write_html

    rows = result["methods"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    metrics = ["pk", "windowdiff", "precision", "recall", "f1"]
    x = np.arange(len(metrics))
    w = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(x + i * w - 0.4 + w / 2, [r[m] for m in metrics], w, label=f"{r['method']} ({r['setting']})")
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("held-out documents (Pk, WindowDiff: lower is better)")
    fig2, ax2 = plt.subplots(figsize=(8, 3.5))
    for name, curve in result["threshold_curves"].items():
        ax2.plot([r["threshold"] for r in curve], [r["windowdiff"] for r in curve], marker=".",
                 label=f"{name} WindowDiff")
        ax2.plot([r["threshold"] for r in curve], [r["f1"] for r in curve], ls="--", label=f"{name} F1")
    ax2.set_xlabel("threshold (train-split documents)")
    ax2.legend(fontsize=7)
    cols = ["method", "setting", "source", "pk", "windowdiff", "precision", "recall", "f1", "chars_pk",
            "chars_windowdiff", "chunks", "mean_chunk_chars"]
    summary = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
    write_html(path, "Segmentation of multi-topic CMRC documents",
               [("Data", html_table([summary])), ("Methods (held-out documents)", html_table(rows, cols)),
                ("Scores", img(figure_png(fig))), ("Threshold on the train split", img(figure_png(fig2)))], result)
