"""Retrieval on real FAISS, the packaged embedder and real SQLite."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retrieval.index import IndexDir, IndexMismatchError
from retrieval.knowledge_base import KnowledgeBase
from retrieval.search import fuse
from retrieval.vector import FaissIndex, TorchExactIndex, choose_type, torch_from_faiss
from tests.conftest import DOCS, write_files


@pytest.fixture()
def kb(settings, tmp_path):
    k = KnowledgeBase(settings, "t", create=True)
    k.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    return k


def _view(hits):
    return [(h.doc_id, h.chunk_id, h.text, round(h.score, 5)) for h in hits]


QUERIES = ["how long do refunds take", "free shipping threshold", "password length", "年假有几天"]


def test_search_finds_the_right_document(kb):
    assert kb.search("when is my refund paid", 2)[0].source == "refunds.md"
    assert kb.search("员工年假多少天", 2)[0].source == "zh.txt"
    hit = kb.search("express delivery price", 1)[0].to_json()
    assert {"chunk_id", "doc_id", "source", "text", "key_info", "score"} <= set(hit)
    assert "9 euros" in hit["text"] and hit["key_info"]["level"] in {"article", "segment", "sentence"}


def test_add_then_delete_leaves_results_identical(kb, tmp_path):
    before = [_view(h) for h in kb.search_many(QUERIES, 3)]
    (item,) = write_files(tmp_path / "extra", {"returns.md": "# Returns\n\nRefunds for returns take 30 days. "
                                                       "Shipping is free for returns. Password resets are free."})
    kb.add_items([item], progress=False)
    during = [_view(h) for h in kb.search_many(QUERIES, 3)]
    assert during != before and any(h[0] == item.doc_id for q in during for h in q)
    assert kb.remove_document(item.doc_id)
    assert [_view(h) for h in kb.search_many(QUERIES, 3)] == before


def test_unchanged_text_is_never_embedded_twice(kb, monkeypatch):
    calls = []
    orig = kb.embedder.encode
    monkeypatch.setattr(kb.embedder, "encode",
                        lambda texts, kind, progress=False: calls.append(len(texts)) or orig(texts, kind))
    import shutil

    shutil.rmtree(kb.dir / "index")
    info = kb.sync()
    assert info["vectors"] > 0 and calls == []  # all from the cache


def test_index_from_another_embedder_is_refused(kb):
    meta_path = IndexDir(kb.dir).root / IndexDir(kb.dir).current() / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["embedder"] = "BAAI/bge-small-zh#0:0"
    meta_path.write_text(json.dumps(meta))
    kb._live = None
    with pytest.raises(IndexMismatchError, match="bge-small-zh.*kb reindex"):
        kb.search("refund")


def test_killed_index_write_leaves_previous_index_loadable(kb, tmp_path):
    before = _view(kb.search("refund", 3))
    gen = IndexDir(kb.dir).current()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        import kb
        from kb.settings import load_settings
        from retrieval import index as ix
        from retrieval.knowledge_base import KnowledgeBase
        orig = ix.FaissIndex.save
        def save_then_die(self, path):
            orig(self, path)
            with open(path, "r+b") as fh:
                fh.truncate(100)            # a half-written file ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... and the process killed mid-write
        ix.FaissIndex.save = save_then_die
        s = load_settings(None, **{{"models.nsp": {str(kb.settings.models.nsp)!r}, "models.device": "cpu"}})
        k = KnowledgeBase(s, "t")
        with k.store() as st:
            st.conn.execute("DELETE FROM documents WHERE source='refunds.md'")
            st.conn.commit()
        k.sync()
    """)
    env = {**os.environ, "KB_HOME": str(kb.settings.home)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert IndexDir(kb.dir).current() == gen
    fresh = KnowledgeBase(kb.settings, "t")
    live = IndexDir(kb.dir).load(kb.settings.retrieval)
    assert live.gen == gen and len(live.vectors) > 0
    # the store lost refunds.md; the old index still loads, and its hits for that document are gone
    assert all(h.source != "refunds.md" for h in fresh.search("refund", 3))
    assert before and before[0][2]


def test_fusion_rrf_and_zscore():
    rrf = fuse([[1, 2, 3], [3, 1]], [1.0, 1.0], "rrf", k=60)
    assert max(rrf, key=rrf.get) == 1 and rrf[2] == pytest.approx(1 / 62)
    # one list has a clear winner standing out of its candidates, the other spreads evenly:
    # rrf ranks their tops alike, zscore follows the confident list
    a_ids, b_ids = list(range(20)), list(range(19, -1, -1))
    a_scores = [10.0] + [1.0 - 0.01 * i for i in range(19)]
    b_scores = [0.60 - 0.01 * i for i in range(20)]
    z = fuse([a_ids, b_ids], [1.0, 1.0], "zscore", raw_scores=[a_scores, b_scores])
    assert max(z, key=z.get) == 0


def test_index_types_and_torch_exact_search_agree():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(100, 3100)
    q = x[:20] + 0.01
    flat = FaissIndex.build(x, ids, "flat")
    _, exact = flat.search(q, 10)
    for kind in ("ivf", "hnsw"):
        _, got = FaissIndex.build(x, ids, kind, nprobe=32, ef_search=128).search(q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)])
        assert recall > 0.8, kind
    _, torch_ids = torch_from_faiss(flat, "cpu").search(q, 10)
    np.testing.assert_array_equal(torch_ids, exact)
    t = TorchExactIndex(x, ids, "cpu")
    assert t.search(q, 1)[1][:, 0].tolist() == list(range(100, 120))
    assert choose_type(10) == "flat" and choose_type(10**6) == "hnsw" and choose_type(5, "ivf") == "ivf"
    flat.remove(np.array([100]))
    assert 100 not in flat.ids() and len(flat) == 2999


def test_reranker_orders_by_cross_encoder_scores(kb, tiny_reranker_dir):
    from sentence_transformers import CrossEncoder

    models = kb.settings.models.model_copy(update={"reranker": str(tiny_reranker_dir)})
    s = kb.settings.model_copy(update={"models": models})
    hits = KnowledgeBase(s, "t").search("refund", 4)
    ce = CrossEncoder(str(tiny_reranker_dir), device="cpu")
    expected = sorted(hits, key=lambda h: -float(ce.predict([("refund", h.text)])[0]))
    assert [h.text for h in hits] == [h.text for h in expected]
    assert all("rerank_score" in h.key_info for h in hits)


def test_a_reader_whose_generation_is_removed_while_it_loads_loads_the_new_one(kb, tmp_path, monkeypatch):
    idir = IndexDir(kb.dir)
    first = idir.current()
    orig = FaissIndex.load
    slowed = []

    def slow_load(path, *args, **kwargs):
        if not slowed:  # while this reader is on its generation, two publishes replace and remove it
            slowed.append(path)
            for i in range(2):
                doc = {f"x{i}.md": f"# Parking {i}\n\nStaff park on level {i}."}
                kb.add_items(write_files(tmp_path / f"x{i}", doc), progress=False)
        return orig(path, *args, **kwargs)

    monkeypatch.setattr(FaissIndex, "load", slow_load)
    live = idir.load(kb.settings.retrieval)
    assert slowed[0].parent.name == first and not (idir.root / first).exists()
    assert live is not None and live.gen == idir.current() != first
    with kb.store() as store:
        assert len(live.vectors) == len(store.key_infos())


def test_reindex_builds_beside_the_live_index_which_answers_until_the_swap(kb, monkeypatch):
    from cli import main

    idir = IndexDir(kb.dir)
    gen = idir.current()
    before = _view(kb.search("refund", 3))
    orig = FaissIndex.build
    during = []

    def failing_build(*args, **kwargs):
        during.append(_view(KnowledgeBase(kb.settings, "t").search("refund", 3)))
        raise RuntimeError("out of memory while building")

    monkeypatch.setattr(FaissIndex, "build", failing_build)
    assert main(["reindex", "--kb", "t", "-q"]) == 1
    assert during == [before]  # the live index answered while the new one was built
    assert idir.current() == gen and _view(KnowledgeBase(kb.settings, "t").search("refund", 3)) == before
    monkeypatch.setattr(FaissIndex, "build", orig)
    meta_path = idir.root / gen / "meta.json"  # built with another embedder: reindex ignores it
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "embedder": "BAAI/bge-small-zh#0:0"}))
    assert main(["reindex", "--kb", "t", "-q"]) == 0
    assert idir.current() not in (None, gen)
    assert _view(KnowledgeBase(kb.settings, "t").search("refund", 3)) == before


def _with_retrieval(kb, **update) -> KnowledgeBase:
    s = kb.settings.model_copy(update={"retrieval": kb.settings.retrieval.model_copy(update=update)})
    return KnowledgeBase(s, kb.name)


def test_search_modes_use_only_their_lists(kb):
    vector = _with_retrieval(kb, search="vector").search("free shipping threshold", 4)
    keyword = _with_retrieval(kb, search="keyword").search("free shipping threshold", 4)
    hybrid = kb.search("free shipping threshold", 4)
    assert vector and all(h.keyword_score is None and h.vector_score is not None for h in vector)
    assert keyword and all(h.vector_score is None and h.keyword_score is not None for h in keyword)
    assert any(h.vector_score is not None for h in hybrid) and any(h.keyword_score is not None for h in hybrid)
    assert keyword[0].source == "shipping.md"
    # a query that shares no word with the documents: BM25 finds nothing, vectors always answer
    assert _with_retrieval(kb, search="keyword").search("zzqx wvvb", 3) == []
    assert len(_with_retrieval(kb, search="vector").search("zzqx wvvb", 3)) == 3


def test_legacy_hybrid_false_means_vector_search():
    from kb.settings import RetrievalConfig, load_settings

    assert RetrievalConfig(hybrid=False).search == "vector"
    assert RetrievalConfig(hybrid=True).search == "hybrid"
    assert RetrievalConfig(hybrid=False, search="keyword").search == "keyword"
    assert load_settings(None, **{"retrieval.hybrid": False}).retrieval.search == "vector"
    assert not RetrievalConfig(search="vector").uses_keywords and RetrievalConfig(search="keyword").uses_keywords


def test_keyword_search_on_an_index_without_bm25_is_a_clear_error(kb):
    from retrieval.index import IndexMismatchError

    vector_only = _with_retrieval(kb, search="vector")
    vector_only.reindex()
    with pytest.raises(IndexMismatchError, match="kb reindex"):
        _with_retrieval(kb, search="keyword").search("refund", 3)
    assert vector_only.search("refund", 3)


def test_an_explicit_search_override_beats_a_legacy_hybrid_false(tmp_path):
    from kb.settings import apply_overrides, load_settings

    legacy = tmp_path / "old.yaml"
    legacy.write_text("retrieval: {hybrid: false}\n", encoding="utf-8")
    assert load_settings(legacy).retrieval.search == "vector"
    assert load_settings(legacy, **{"retrieval.search": "hybrid"}).retrieval.search == "hybrid"
    assert apply_overrides(load_settings(legacy), {"retrieval.search": "hybrid"}).retrieval.search == "hybrid"
