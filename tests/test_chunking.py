import numpy as np
import pytest

from ingest.chunking import FixedChunker, NSPChunker, to_units
from ingest.nsp import CrossNSPScorer, continuation_prob
from ingest.types import Block, ParsedDocument, Unit


class TableScorer:
    """Deterministic scorer for merge-logic tests: P(continue) looked up by the next unit's text."""

    def __init__(self, probs: dict[str, float]):
        self.probs = probs
        self.calls = 0

    def continue_probs(self, pairs, temperature=1.0):
        self.calls += 1
        return np.array([self.probs.get(b, 0.9) for _, b in pairs], dtype=np.float32)


def units(*texts, section=0):
    return [Unit(t, section=section) for t in texts]


def test_merges_while_probability_is_above_threshold():
    u = units("Alpha one is here.", "Alpha two follows.", "Beta starts now.", "Beta goes on.")
    chunker = NSPChunker(TableScorer({"Beta starts now.": 0.1}), threshold=0.5, min_chars=0)
    (chunks,) = chunker.chunk_many([u])
    assert [c.text for c in chunks] == ["Alpha one is here. Alpha two follows.", "Beta starts now. Beta goes on."]
    assert chunks[0].sentences == ["Alpha one is here.", "Alpha two follows."]


def test_max_chars_and_sections_are_hard_limits():
    u = units("a" * 30, "b" * 30, "c" * 30) + units("d" * 10, section=1)
    (chunks,) = NSPChunker(TableScorer({}), threshold=0.0, max_chars=65, min_chars=0).chunk_many([u])
    assert [len(c.text) for c in chunks] == [61, 30, 10]


def test_short_chunk_takes_next_unit_regardless():
    u = units("Hi.", "This is a much longer sentence that follows.")
    (chunks,) = NSPChunker(TableScorer({u[1].text: 0.0}), min_chars=10).chunk_many([u])
    assert [c.text for c in chunks] == ["Hi. This is a much longer sentence that follows."]


def test_all_documents_scored_in_one_batched_call():
    scorer = TableScorer({})
    out = NSPChunker(scorer, min_chars=0).chunk_many([units("a.", "b."), units("c.", "d.", "e."), units("f.")])
    assert scorer.calls == 1 and [len(x) for x in out] == [1, 1, 1]


def test_temperature_softens_probabilities():
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    p1, p4 = continuation_prob(logits, 1.0), continuation_prob(logits, 4.0)
    assert p1[0] == pytest.approx(1 / (1 + np.exp(-2)))
    assert 0.5 < p4[0] < p1[0] and p1[1] < p4[1] < 0.5
    with pytest.raises(ValueError):
        continuation_prob(logits, 0)


def test_tiny_model_scores_batched_in_input_order(tiny_nsp_dir):
    scorer = CrossNSPScorer(tiny_nsp_dir, device="cpu", batch_size=2)
    pairs = [("short", "pair"), ("a much longer first sentence here", "and a long second one too"),
             ("mid length", "text here"), ("x", "y")]
    batched = scorer.continue_probs(pairs)
    one_by_one = np.concatenate([scorer.continue_probs([p]) for p in pairs])
    assert batched.shape == (4,) and np.all((batched > 0) & (batched < 1))
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_units_follow_structure():
    doc = ParsedDocument("p", "s", "d", "h", [
        Block("Guide", "title"), Block("First sentence. Second one."),
        Block("Details", "title", depth=1), Block("item a", "list"), Block("item b", "list"),
        Block("x | y\n1 | 2", "table")])
    u = to_units(doc)
    assert [x.text for x in u] == ["First sentence.", "Second one.", "- item a\n- item b", "x | y\n1 | 2"]
    assert u[0].title_path == ("Guide",) and u[2].title_path == ("Guide", "Details")
    assert u[0].section != u[2].section and u[2].atomic and u[3].atomic


def test_long_table_split_repeats_header():
    rows = "\n".join(["h1 | h2"] + [f"r{i} | v{i}" for i in range(40)])
    doc = ParsedDocument("p", "s", "d", "h", [Block(rows, "table")])
    parts = to_units(doc, max_chars=80)
    assert len(parts) > 1 and all(p.text.startswith("h1 | h2") for p in parts)
    assert all(len(p.text) <= 80 for p in parts)


def test_fixed_chunker_is_langchain_recursive_splitter():
    u = units(*[f"Sentence number {i} is here." for i in range(40)])
    (chunks,) = FixedChunker(size=120, overlap=20).chunk_many([u])
    assert len(chunks) > 5 and all(len(c.text) <= 120 for c in chunks)


def test_sentence_chunker_makes_one_chunk_per_unit():
    from ingest.chunking import SentenceChunker
    from ingest.types import Unit

    units = [Unit("第一句话。", ("标题",), 1, False, 1), Unit("Second sentence here.", ("标题",), 1, False, 1),
             Unit("a | b\n1 | 2", ("标题",), 2, True, 1)]
    (chunks,) = SentenceChunker().chunk_many([units])
    assert [c.text for c in chunks] == [u.text for u in units]
    assert [c.ord for c in chunks] == [0, 1, 2] and chunks[2].page == 2
    assert chunks[0].sentences == ["第一句话。"] and chunks[2].sentences == []


def test_sentence_method_reaches_the_pipeline(settings, tmp_path):
    from retrieval.knowledge_base import KnowledgeBase
    from tests.conftest import write_files

    s = settings.model_copy(update={"chunking": settings.chunking.model_copy(update={"method": "sentence"})})
    kb = KnowledgeBase(s, "sent", create=True)
    files = write_files(tmp_path / "d", {"a.txt": "One short line here. Another one follows. And a third."})
    report = kb.add_items(files, progress=False)
    assert report["chunker"] == "sentence"
    with kb.store() as store:
        assert [c["text"] for d in store.documents() for c in store.chunks(d.doc_id)] == [
            "One short line here.", "Another one follows.", "And a third."]


def test_a_heading_with_nothing_under_it_keeps_its_text():
    """A short line taken for a title, followed by a title of the same depth, lost its text."""
    doc = ParsedDocument("p", "s", "d", "h", [
        Block("Forwarded note", "title", depth=0),
        Block("Attachment: a.docx", "title", depth=0),
        Block("Body of the attachment.", "text"),
        Block("Part A", "title", depth=0),
        Block("Part A.1", "title", depth=1),
        Block("Text of A.1.", "text"),
        Block("Closing line", "title", depth=0),
    ])
    units = [(u.text, u.title_path) for u in to_units(doc)]
    assert units == [
        ("Forwarded note", ()),
        ("Body of the attachment.", ("Attachment: a.docx",)),
        ("Text of A.1.", ("Part A", "Part A.1")),
        ("Closing line", ()),
    ]
    only_titles = ParsedDocument("p", "s", "d", "h", [Block("One", "title"), Block("Two", "title")])
    assert [u.text for u in to_units(only_titles)] == ["One", "Two"]
