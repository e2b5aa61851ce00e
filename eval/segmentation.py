"""Topic segmentation: how well a chunker cuts multi-topic documents where the topics change.

Documents are made by joining 3-8 paragraphs of different articles (CMRC 2018), so the true
boundaries are known: the first sentence of each paragraph after the first. Metrics, pooled over
all documents (sums of errors over sums of windows / boundaries):
- Pk (Beeferman et al. 1999): the share of windows of k atoms whose two ends are wrongly judged
  to be in the same / different segments; k = half the document's mean true segment length.
- WindowDiff (Pevzner & Hearst 2002): the share of windows whose count of boundaries differs.
- Boundary precision, recall and F1 (a predicted boundary matches a true one at the same place).
Lower Pk and WindowDiff are better. Atoms are the units the chunker moves (sentences); the
fixed-size splitter cuts inside sentences, so each of its cuts counts at the nearest unit start
(`units` level); the `chars` level scores every method on character offsets instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


# metrics ----------------------------------------------------------------------------------------
def _labels(bounds: Sequence[int], n: int) -> np.ndarray:
    """Segment number of each of `n` atoms; `bounds` are the atoms that start a new segment."""
    lab = np.zeros(n, dtype=np.int64)
    for b in bounds:
        if 0 < b < n:
            lab[b:] += 1
    return lab


def window_size(ref: Sequence[int], n: int) -> int:
    """Half the mean true segment length (at least 1)."""
    return max(1, int(round(n / (len(set(b for b in ref if 0 < b < n)) + 1) / 2)))


def pk_counts(ref: Sequence[int], hyp: Sequence[int], n: int, k: int | None = None) -> tuple[int, int]:
    """(errors, windows) of Pk on one document of `n` atoms."""
    k = min(k or window_size(ref, n), n - 1)
    if k < 1:
        return 0, 0
    r, h = _labels(ref, n), _labels(hyp, n)
    errors = int(((r[:-k] == r[k:]) != (h[:-k] == h[k:])).sum())
    return errors, n - k


def windowdiff_counts(ref: Sequence[int], hyp: Sequence[int], n: int, k: int | None = None) -> tuple[int, int]:
    """(errors, windows) of WindowDiff: boundaries in atoms (i, i + k] differ in number."""
    k = min(k or window_size(ref, n), n - 1)
    if k < 1:
        return 0, 0
    r, h = _labels(ref, n), _labels(hyp, n)
    errors = int(((r[k:] - r[:-k]) != (h[k:] - h[:-k])).sum())
    return errors, n - k


def boundary_counts(ref: Sequence[int], hyp: Sequence[int], tolerance: int = 0) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives); each true boundary matches at most one
    predicted boundary within `tolerance` atoms."""
    free = sorted(set(ref))
    tp = 0
    for b in sorted(set(hyp)):
        near = [r for r in free if abs(r - b) <= tolerance]
        if near:
            free.remove(min(near, key=lambda r: abs(r - b)))
            tp += 1
    return tp, len(set(hyp)) - tp, len(set(ref)) - tp


def pk(ref: Sequence[int], hyp: Sequence[int], n: int, k: int | None = None) -> float:
    """Pk of one document of `n` atoms (0.0 where it has no window)."""
    e, w = pk_counts(ref, hyp, n, k)
    return e / w if w else 0.0


def windowdiff(ref: Sequence[int], hyp: Sequence[int], n: int, k: int | None = None) -> float:
    """WindowDiff of one document of `n` atoms (0.0 where it has no window)."""
    e, w = windowdiff_counts(ref, hyp, n, k)
    return e / w if w else 0.0


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 from the counts (0.0 where undefined)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def score(items: Sequence[tuple[Sequence[int], Sequence[int], int]], tolerance: int = 0) -> dict:
    """Pooled metrics over documents given as (true boundaries, predicted boundaries, atoms)."""
    pe = pw = we = ww = tp = fp = fn = 0
    for ref, hyp, n in items:
        e, w = pk_counts(ref, hyp, n)
        pe, pw = pe + e, pw + w
        e, w = windowdiff_counts(ref, hyp, n)
        we, ww = we + e, ww + w
        a, b, c = boundary_counts(ref, hyp, tolerance)
        tp, fp, fn = tp + a, fp + b, fn + c
    out = {"pk": pe / pw if pw else 0.0, "windowdiff": we / ww if ww else 0.0, **prf(tp, fp, fn)}
    return {k: round(v, 4) for k, v in out.items()}


# documents --------------------------------------------------------------------------------------
@dataclass
class SegDoc:
    """A multi-topic document: its units, the units that start a topic, and unit char offsets."""

    units: list
    bounds: list[int]
    text: str
    offsets: list[int]
    paragraphs: list[int]


def make_documents(paragraphs: Sequence, n_docs: int, seed: int, min_k: int = 3, max_k: int = 8,
                   max_chars: int = 600) -> list[SegDoc]:
    """`n_docs` documents of 3-8 paragraphs of different articles (objects with `.index`,
    `.article`, `.context`, e.g. `eval.data.Paragraph`), no titles."""
    from ingest.chunking import join_units, to_units
    from ingest.types import Block, ParsedDocument

    rng = random.Random(seed)
    by_article: dict[int, list] = {}
    for p in paragraphs:
        by_article.setdefault(p.article, []).append(p)
    articles = sorted(by_article)
    if len(articles) < min_k:
        raise ValueError(f"need paragraphs of at least {min_k} articles, got {len(articles)}")
    docs = []
    for _ in range(n_docs):
        picked = rng.sample(articles, rng.randint(min_k, min(max_k, len(articles))))
        chosen = [rng.choice(by_article[a]) for a in picked]
        units, bounds = [], []
        for p in chosen:
            if units:
                bounds.append(len(units))
            units += to_units(ParsedDocument("", "", "", "", [Block(p.context)]), max_chars)
        text, offsets = "", []
        for u in units:
            text = join_units(text, u.text)
            offsets.append(len(text) - len(u.text))
        docs.append(SegDoc(units, bounds, text, offsets, [p.index for p in chosen]))
    return docs


def adjacent_pairs(docs: Sequence[SegDoc]) -> list[tuple[str, str]]:
    """The (unit, next unit) texts of every document, in order."""
    return [(d.units[i].text, d.units[i + 1].text) for d in docs for i in range(len(d.units) - 1)]


# chunkers -> boundaries ---------------------------------------------------------------------------
def nsp_cuts(docs: Sequence[SegDoc], probs: np.ndarray, threshold: float,
             chunking) -> tuple[list[list[int]], list[int]]:
    """Predicted unit boundaries of the NSP chunker at `threshold` from precomputed
    continuation probabilities (all documents' adjacent pairs, in order); and chunk lengths."""
    from ingest.chunking import NSPChunker

    chunker = NSPChunker(None, threshold, chunking.temperature, chunking.max_chars, chunking.min_chars)
    cuts, lengths, s = [], [], 0
    for d in docs:
        e = s + len(d.units) - 1
        chunks = chunker.merge(d.units, probs[s:e])
        s = e
        sizes = [len(c.sentences) for c in chunks]
        cuts.append(list(np.cumsum(sizes)[:-1]))
        lengths += [len(c.text) for c in chunks]
    return cuts, lengths


def fixed_cuts(docs: Sequence[SegDoc], size: int, overlap: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """The fixed-size splitter's cuts: (nearest unit starts, character offsets, chunk lengths)."""
    from ingest.chunking import FixedChunker

    chunker = FixedChunker(size, overlap)
    unit_cuts, char_cuts, lengths = [], [], []
    for d, chunks in zip(docs, chunker.chunk_many([d.units for d in docs])):
        starts, pos = [], 0
        for c in chunks:
            at = d.text.find(c.text, pos)
            at = pos if at < 0 else at
            starts.append(at)
            pos = at + 1
            lengths.append(len(c.text))
        offs = np.asarray(d.offsets)
        char_cuts.append([s for s in starts[1:] if s > 0])
        unit_cuts.append(sorted({int(np.abs(offs - s).argmin()) for s in starts[1:]} - {0}))
    return unit_cuts, char_cuts, lengths


def char_bounds(d: SegDoc, unit_bounds: Sequence[int]) -> list[int]:
    """The character offsets of the unit boundaries `unit_bounds` of `d`."""
    return [d.offsets[b] for b in unit_bounds]


def score_units(docs: Sequence[SegDoc], cuts: Sequence[Sequence[int]]) -> dict:
    """Pooled segmentation metrics of predicted unit cuts against the true unit boundaries."""
    return score([(d.bounds, c, len(d.units)) for d, c in zip(docs, cuts)])


def score_chars(docs: Sequence[SegDoc], char_cuts: Sequence[Sequence[int]]) -> dict:
    """Pk and WindowDiff of predicted character cuts against the true boundaries in characters."""
    out = score([(char_bounds(d, d.bounds), c, len(d.text)) for d, c in zip(docs, char_cuts)])
    return {k: out[k] for k in ("pk", "windowdiff")}


THRESHOLD_GRID = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))


def tune_threshold(docs: Sequence[SegDoc], probs: np.ndarray, chunking,
                   grid: Sequence[float] = THRESHOLD_GRID) -> tuple[float, list[dict]]:
    """The threshold with the lowest WindowDiff on `docs` (ties: higher F1), and the whole curve."""
    curve = []
    for t in grid:
        cuts, lengths = nsp_cuts(docs, probs, float(t), chunking)
        curve.append({"threshold": float(t), **score_units(docs, cuts),
                      "mean_chunk_chars": round(float(np.mean(lengths)), 1)})
    best = min(curve, key=lambda r: (r["windowdiff"], -r["f1"]))
    return best["threshold"], curve


def match_fixed_size(docs: Sequence[SegDoc], target_chars: float, overlap: int,
                     low: int = 60, high: int = 2000) -> int:
    """The fixed splitter's chunk size whose mean chunk length on `docs` is closest to
    `target_chars` (bisection: the mean grows with the size), to 5 characters."""
    mean = lambda size: float(np.mean(fixed_cuts(docs, size, overlap)[2]))  # noqa: E731
    low = max(low, overlap + 10)
    while high - low > 5:
        mid = (low + high) // 2
        if mean(mid) < target_chars:
            low = mid
        else:
            high = mid
    return min((low, high), key=lambda size: abs(mean(size) - target_chars))
