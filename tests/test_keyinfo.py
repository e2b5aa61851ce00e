from ingest.keyinfo import ExtractiveKeyInfo, entities, keywords, summarize
from ingest.types import Chunk, ParsedDocument


def test_chinese_keywords_and_entities():
    text = "华为公司在深圳发布了新款手机。华为手机采用自研芯片，深圳的工厂负责生产这些手机。"
    kws = keywords(text, 5)
    assert "手机" in kws and any("华为" in k for k in kws)
    ents = entities(text)
    assert "深圳" in ents


def test_english_keyphrases_and_entities():
    text = ("Norwich City Football Club is an English football club based in Norwich. "
            "The club plays home matches at Carrow Road. Norwich City won the League Cup twice.")
    kws = keywords(text, 6)
    assert any("norwich city football club" in k for k in kws)
    assert "Norwich City" in entities(text) or "Norwich City Football Club" in entities(text)


def test_summary_prefers_central_sentences_in_order():
    sents = ["Solar panels convert sunlight into electricity.", "My cat likes fish.",
             "Solar electricity from panels is cheap.", "Panels need sunlight to produce electricity."]
    s = summarize(sents, 2)
    assert "cat" not in s and s.startswith("Solar panels convert")


def test_every_level_maps_to_raw_text():
    doc = ParsedDocument("p", "guide.md", "d1", "h", [], title="Refund policy")
    chunks = [Chunk("Refunds are paid within 14 days. Ask the service desk for the form.", 0, ("Refund policy",),
                    sentences=["Refunds are paid within 14 days.", "Ask the service desk for the form."]),
              Chunk("Shipping is free above 50 euros.", 1, ("Refund policy", "Shipping"),
                    sentences=["Shipping is free above 50 euros."])]
    kis = ExtractiveKeyInfo(min_sentence_chars=5).extract(doc, chunks)
    levels = [k.level for k in kis]
    assert levels == ["article", "segment", "sentence", "sentence", "segment"]
    assert kis[0].raw_text == chunks[0].text + "\n\n" + chunks[1].text
    assert kis[1].raw_text == chunks[0].text and kis[2].raw_text == "Refunds are paid within 14 days."
    assert kis[4].key_text.startswith("Refund policy > Shipping")
    assert all(k.key_text for k in kis)


def test_article_text_holds_overlapping_fixed_chunks_once():
    from ingest.chunking import FixedChunker
    from ingest.keyinfo import article_text
    from ingest.types import Unit

    text = "。".join(f"第{i}句话讲的是一件不同的事情，编号{i}" for i in range(60)) + "。"
    (chunks,) = FixedChunker(120, 30).chunk_many([[Unit(text, (), None, False, 0)]])
    assert len(chunks) > 5 and any(a.text[-10:] in b.text for a, b in zip(chunks, chunks[1:]))  # they overlap
    assert article_text([c.text for c in chunks]).replace("\n", "") == text
    assert article_text(["第一段。", "第二段，另一件事。"]) == "第一段。\n\n第二段，另一件事。"
