"""Segmentation metrics on hand-made cases, documents with known boundaries, the chunkers' cuts."""

import numpy as np
import pytest

from eval.segmentation import (
    boundary_counts,
    fixed_cuts,
    make_documents,
    nsp_cuts,
    pk,
    score,
    tune_threshold,
    window_size,
    windowdiff,
)
from kb.settings import ChunkingConfig


def test_perfect_and_empty_segmentations():
    ref = [4, 8]
    assert pk(ref, ref, 12) == 0.0 and windowdiff(ref, ref, 12) == 0.0
    assert window_size(ref, 12) == 2  # mean segment 4 atoms
    # no boundary at all: windows (i, i+2) that straddle a true boundary are wrong: i = 2,3,6,7 of 10
    assert pk(ref, [], 12) == pytest.approx(4 / 10)
    assert windowdiff(ref, [], 12) == pytest.approx(4 / 10)


def test_near_miss_costs_less_than_a_miss_and_windowdiff_counts_extras():
    ref = [5]  # two segments of 5, k = 2 (round(2.5) = 2)
    assert window_size(ref, 10) == 2
    assert pk(ref, [6], 10) == pytest.approx(2 / 8)  # windows (3, 5) and (5, 7) are wrong
    assert pk(ref, [], 10) == pytest.approx(2 / 8)  # (3, 5) and (4, 6)
    assert pk(ref, [9], 10) == pytest.approx(3 / 8)  # and (7, 9)
    # one boundary too many in window (4, 6]: both ends are apart either way, so Pk does not see
    # it there; WindowDiff counts 2 boundaries against 1
    assert pk(ref, [5, 6], 10) == pytest.approx(1 / 8)
    assert windowdiff(ref, [5, 6], 10) == pytest.approx(2 / 8)
    assert windowdiff(ref, [5], 10) == 0.0


def test_boundary_f1_exact_and_with_tolerance():
    assert boundary_counts([3, 7], [3, 8]) == (1, 1, 1)
    assert boundary_counts([3, 7], [3, 8], tolerance=1) == (2, 0, 0)
    assert boundary_counts([3], [2, 4], tolerance=1) == (1, 1, 0)  # one true boundary matches once
    s = score([([3, 7], [3, 8], 10), ([5], [5], 10)])
    assert (s["precision"], s["recall"]) == (pytest.approx(2 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4))
    assert s["f1"] == pytest.approx(2 / 3, abs=1e-4)


class P:
    def __init__(self, index, article, context):
        self.index, self.article, self.context = index, article, context


PARAS = [P(i, i, "".join(f"第{i}段的第{j}句话讲的是主题{i}。" for j in range(4))) for i in range(10)]


def test_documents_join_paragraphs_of_different_articles_with_known_boundaries():
    docs = make_documents(PARAS, 5, seed=1)
    for d in docs:
        assert 3 <= len(d.paragraphs) <= 8 and len(set(d.paragraphs)) == len(d.paragraphs)
        assert d.bounds == [4 * i for i in range(1, len(d.paragraphs))]
        assert all(d.text[o:].startswith(u.text) for o, u in zip(d.offsets, d.units))


def test_nsp_cuts_follow_probabilities_and_threshold_tuning_finds_them():
    docs = make_documents(PARAS, 4, seed=2)
    cfg = ChunkingConfig(min_chars=0, max_chars=10_000)
    probs = np.concatenate([[0.1 if i + 1 in d.bounds else 0.9 for i in range(len(d.units) - 1)] for d in docs])
    cuts, _ = nsp_cuts(docs, probs, 0.5, cfg)
    assert cuts == [d.bounds for d in docs]
    best, curve = tune_threshold(docs, probs, cfg)
    assert 0.1 < best <= 0.9 and len(curve) == 19
    assert min(r["windowdiff"] for r in curve) == 0.0


def test_fixed_cuts_snap_to_the_nearest_unit_start():
    docs = make_documents(PARAS, 2, seed=3)
    unit_cuts, char_cuts, lengths = fixed_cuts(docs, 60, 0)
    for d, uc, cc in zip(docs, unit_cuts, char_cuts):
        assert uc and all(0 < u < len(d.units) for u in uc)
        assert set(cc) <= set(d.offsets)  # the splitter cuts after "。": at unit starts here
        for c in cc:  # every char cut snaps to the unit start nearest to it
            nearest = int(np.abs(np.asarray(d.offsets) - c).argmin())
            assert nearest == 0 or nearest in uc
    assert max(lengths) <= 60
