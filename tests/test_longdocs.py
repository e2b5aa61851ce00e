"""Long multi-topic documents built from CMRC, and the context metrics that score them."""

from __future__ import annotations

import json

import pytest

from eval.context import norm, overlap, score_texts
from eval.data import squad_paragraphs
from eval.longdocs import build_long_docs, write_long_docs
from tests.conftest import CMRC


@pytest.fixture(scope="module")
def kb_paragraphs():
    return [p for p in squad_paragraphs(CMRC) if p.split == "kb"]


def test_every_gold_answer_inside_its_gold_paragraph_span(tmp_path, kb_paragraphs):
    docs, n = write_long_docs(CMRC, tmp_path / "docs", ("kb",), questions=tmp_path / "q.jsonl", ask=("kb", "out"))
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == len(rows) == sum(len(p.questions) for p in squad_paragraphs(CMRC) if p.split in ("kb", "out"))
    texts = {d.name: (tmp_path / "docs" / d.name).read_text(encoding="utf-8") for d in docs}
    inside = [r for r in rows if r["in_kb"]]
    assert len(inside) == sum(len(p.questions) for p in kb_paragraphs)
    assert all(r["doc"] is None and r["span"] is None for r in rows if not r["in_kb"])
    for r in inside:
        start, end = r["span"]
        piece = texts[r["doc"]][start:end]
        assert norm(piece) == norm(r["context"]), r["id"]
        assert any(a in piece for a in r["answers"]), (r["id"], r["answers"])
        assert all(a in piece for a in r["answers"] if a in r["context"]), (r["id"], r["answers"])
        # the span is exactly the paragraph: a paragraph break (or the document's edge) on each side
        text = texts[r["doc"]]
        assert start == 0 or text[start - 2 : start] == "\n\n"
        assert text[end : end + 2] in ("\n\n", "\n")


def test_documents_are_long_and_multi_topic(kb_paragraphs):
    docs = build_long_docs(kb_paragraphs, 3000, 20000, seed=13)
    lengths = [len(d.text) for d in docs]
    assert min(lengths) >= 3000 and max(lengths) <= 20000 + 1000  # the last topic may run over its target
    assert all(len({p.article for p in kb_paragraphs if p.index in d.spans}) >= 3 for d in docs)
    assert sorted(i for d in docs for i in d.spans) == sorted(p.index for p in kb_paragraphs)
    # paragraph breaks inside topics too, so a break is no hint of a topic change
    assert sum(d.text.count("\n\n") for d in docs) > len(kb_paragraphs) + 20
    assert [d.text for d in build_long_docs(kb_paragraphs, 3000, 20000, seed=13)] == [d.text for d in docs]
    assert [d.text for d in build_long_docs(kb_paragraphs, 3000, 20000, seed=14)] != [d.text for d in docs]


def test_bad_lengths_are_refused(kb_paragraphs):
    with pytest.raises(ValueError, match="min_chars"):
        build_long_docs(kb_paragraphs, 5000, 3000)


GOLD = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未"


OVERLAPS = [
    # the hit's end runs into the paragraph
    ("外外外外外外外外外外" + GOLD[:9], GOLD[:9]),
    # the hit's start continues the paragraph's end
    (GOLD[5:] + "后后后后后后后后后后", GOLD[5:]),
    # the whole paragraph inside a longer hit
    ("前前" + GOLD + "后后", GOLD),
    # a sentence of the paragraph
    (GOLD[3:7], GOLD[3:7]),
    # too short a run to say it is the paragraph
    ("外外外外外外外外外外" + GOLD[:3], ""),
    ("毫不相干的另一段文字，毫不相干。", ""),
    # an article cut with an ellipsis
    (GOLD[:12] + "…", GOLD[:12]),
]


@pytest.mark.parametrize(("text", "expected"), OVERLAPS)
def test_overlap(text, expected):
    assert overlap(text, GOLD) == expected


def test_context_scores_do_not_reward_returning_everything():
    other = "这是另一个主题的一段文字，里面也提到了丙丁两个字。" * 4
    focused = score_texts([GOLD], GOLD, ["丙丁"])
    everything = score_texts([other + GOLD + other], GOLD, ["丙丁"])
    assert focused.answer_in and everything.answer_in
    assert focused.precision == 1.0 and everything.precision < 0.2
    assert everything.chars > 5 * focused.chars
    # the answer string inside another passage does not count as the answer retrieved
    assert not score_texts([other], GOLD, ["丙丁"]).answer_in
    # nor does a short sentence of another document that happens to occur in the paragraph
    assert score_texts([GOLD[2:6]], GOLD, ["丙丁"]).answer_in
    assert not score_texts([GOLD[2:6]], GOLD, ["丙丁"], same_doc=[False]).answer_in
