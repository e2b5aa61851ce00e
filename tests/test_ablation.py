"""`kb eval ablate`: one factor at a time, each row's settings reaching the KB it builds and searches."""

from __future__ import annotations

import json

import pytest

from eval.ablate import BASE, FACTORS, grid, row_settings, run_ablation
from eval.ablate_report import markdown, write_report
from kb.settings import load_settings
from tests.conftest import CMRC


def _dotted(settings, key: str):
    section, name = key.split(".")
    return getattr(getattr(settings, section), name)


def test_grid_changes_one_factor_at_a_time():
    rows = grid()
    assert rows[0].name == "reference" and rows[0].levels == BASE
    assert len(rows) == 1 + sum(len(levels) - 1 for levels in FACTORS.values())
    for r in rows[1:]:
        changed = [f for f in FACTORS if r.levels[f] != BASE[f]]
        assert changed == [r.factor], r.name
    assert [r.name for r in grid(["search"])] == ["reference", "search=vector", "search=keyword"]


def test_every_row_setting_arrives(tmp_path, monkeypatch):
    # an environment that sets every factor otherwise: the rows must still get what they name
    monkeypatch.setenv("KB_RETRIEVAL__SEARCH", "vector")
    monkeypatch.setenv("KB_RETRIEVAL__LEVELS", '["segment"]')
    monkeypatch.setenv("KB_RETRIEVAL__EMBED_FIELD", "raw_text")
    monkeypatch.setenv("KB_RETRIEVAL__RERANK", "false")
    monkeypatch.setenv("KB_MODELS__RERANKER", "/env/rr")
    monkeypatch.setenv("KB_MODELS__NSP", "/env/nsp")
    monkeypatch.setenv("KB_CHUNKING__METHOD", "fixed")
    base = load_settings(None, **{"eval.ablate_nsp": "/m/nsp", "eval.ablate_reranker": "/m/rr"})
    seen = set()
    for row in grid():
        overrides = row.overrides(base, {"matched_fixed_size": 455})
        s = row_settings(None, tmp_path / "home", tmp_path / "models", overrides)
        for key, value in overrides.items():
            assert _dotted(s, key) == value, (row.name, key)
            seen.add(key)
        assert s.home == tmp_path / "home" and s.models_dir() == tmp_path / "models"
    assert {"models.nsp", "chunking.method", "retrieval.levels", "retrieval.embed_field", "retrieval.search",
            "models.reranker"} <= seen
    overrides = {r.name: r.overrides(base, {"matched_fixed_size": 455}) for r in grid()}
    assert overrides["chunking=fixed-matched"]["chunking.fixed_size"] == 455
    assert overrides["chunking=fixed-matched"]["chunking.fixed_overlap"] == 46
    assert overrides["chunking=nsp-cross"]["models.nsp"] == "/m/nsp"
    assert overrides["rerank=on"]["models.reranker"] == "/m/rr"
    ref = row_settings(None, tmp_path / "home", tmp_path / "models", overrides["reference"])
    assert (ref.chunking.method, ref.models.nsp, ref.nsp_train.kind) == ("nsp", None, "pair_head")
    assert (ref.retrieval.levels, ref.retrieval.embed_field) == (["article", "segment", "sentence"], "key_text")
    assert (ref.retrieval.search, ref.models.reranker, ref.retrieval.rerank) == ("hybrid", None, False)
    on = row_settings(None, tmp_path / "home", tmp_path / "models", overrides["rerank=on"])
    assert (on.models.reranker, on.retrieval.rerank) == ("/m/rr", True)
    assert overrides["chunking=nsp-pair-tuned"]["chunking.threshold"] == base.eval.ablate_pair_threshold


@pytest.fixture()
def small_squad(tmp_path):
    data = json.loads(CMRC.read_text(encoding="utf-8-sig"))
    data["data"] = data["data"][:20]  # 20 paragraphs: 8 in the `kb` split
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_ablation_end_to_end(settings, small_squad, tmp_path, tiny_nsp_dir, tiny_reranker_dir, monkeypatch):
    from retrieval.index import IndexDir
    from retrieval.knowledge_base import KnowledgeBase

    cfg = tmp_path / "ablate.yaml"
    cfg.write_text("models: {device: cpu, llm: null}\nllm: {adapter: null}\n"
                   f"eval: {{ablate_nsp: '{tiny_nsp_dir}', ablate_reranker: '{tiny_reranker_dir}'}}\n"
                   "nsp_train: {max_pairs: 200, min_pairs: 20}\n", encoding="utf-8")
    result = run_ablation(small_squad, tmp_path / "work", config=cfg, corpora=("long",), limit=10, progress=False)
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == [r.name for r in grid()]
    assert result["corpora"]["long"]["questions"] == 10 and len(result["corpora"]["long"]["sha256"]) == 64
    assert result["provenance"]["config"]["eval"]["ablate_nsp"] == str(tiny_nsp_dir)
    assert list(result["provenance"]["data_sha256"]) == [str(small_squad)]
    builds = {name: r["build"] for name, r in rows.items()}
    assert builds["chunking=nsp-cross"]["chunker"] == f"nsp ({tiny_nsp_dir})"
    assert builds["chunking=fixed"]["chunker"] == "fixed" and builds["chunking=sentence"]["chunker"] == "sentence"
    reference = builds["reference"]["chunker"]
    assert reference.startswith("nsp (") and str(tiny_nsp_dir) not in reference
    assert builds["chunking=sentence"]["chunks"] > builds["chunking=fixed"]["chunks"]
    assert builds["chunking=sentence"]["mean_chunk_chars"] < builds["chunking=fixed"]["mean_chunk_chars"]
    # rows that change only the search share the reference's KB; the single-level row has its own index
    assert builds["search=keyword"]["kb"] == builds["rerank=on"]["kb"] == builds["reference"]["kb"]
    single = IndexDir(tmp_path / "work" / "kb" / builds["index=single-level"]["kb"]).load(
        load_settings(cfg, **{"retrieval.levels": ["segment"], "retrieval.embed_field": "raw_text"}).retrieval, None)
    assert single.meta["levels"] == ["segment"] and single.meta["embed_field"] == "raw_text"
    ref_strict = sum(q.get("strict", False) for q in rows["reference"]["per_question"])
    for r in rows.values():
        v = r["vs_reference"]["strict"]
        assert v["gained"] - v["lost"] == sum(q.get("strict", False) for q in r["per_question"]) - ref_strict
        assert r["recall@5_strict"] <= r["recall@5"]
        assert r["chars_to_llm"] <= r["chars_in_budget"] <= r["budget"]
    assert rows["chunking=sentence"]["chars@5"] < rows["chunking=fixed"]["chars@5"]
    table = markdown(result)
    assert len(table.splitlines()) == 2 + len(rows) and "| long | search=keyword |" in table
    write_report(result, str(tmp_path / "r.html"))
    assert (tmp_path / "r.html").read_text().count("<img") == 1
    assert json.loads((tmp_path / "r.json").read_text())["grid"] == [r.name for r in grid()]

    # the rows' searches: the reranker scores every hit, keyword search has no vector scores
    from eval.ablate import Builds

    builds_ = Builds("long", tmp_path / "work" / "long" / "docs", cfg, load_settings(cfg), tmp_path / "work" / "kb",
                     False)
    by_name = {r.name: r for r in grid()}
    s_on, kb_on, _ = builds_.settings(by_name["rerank=on"])
    hits = KnowledgeBase(s_on, kb_on).search(result["rows"][0]["per_question"][0]["question"], 5)
    assert hits and all("rerank_score" in h.key_info for h in hits)
    s_kw, kb_kw, _ = builds_.settings(by_name["search=keyword"])
    hits = KnowledgeBase(s_kw, kb_kw).search(result["rows"][0]["per_question"][0]["question"], 5)
    assert hits and all(h.vector_score is None for h in hits)
    # the fixed splitter's size for fixed-matched gives chunks about as long as the reference's
    matched = builds["chunking=fixed-matched"]["mean_chunk_chars"]
    assert abs(matched - builds["reference"]["mean_chunk_chars"]) < 0.25 * builds["reference"]["mean_chunk_chars"]

    # the answer phase on the best two rows reuses their KBs (no ingest) and asks both kinds of question
    from eval.ablate_answers import pick_best, run_answers

    best = pick_best(result, "long", 2)
    assert len(best) == 2 and rows[best[0]]["answer_in_budget"] >= max(r["answer_in_budget"] for r in rows.values())
    monkeypatch.setattr(KnowledgeBase, "add_paths", lambda *a, **kw: pytest.fail("a built KB was ingested again"))
    answers = run_answers(small_squad, tmp_path / "work", best, config=cfg, n_in=4, n_out=2, progress=False)
    assert [r["row"] for r in answers["rows"]] == best
    for r in answers["rows"]:
        assert (r["n_in_kb"], r["n_not_in_kb"]) == (4, 2) and r["refusal_correct"] is not None
        assert r["mode"] == "extractive" and r["build"] == rows[r["row"]]["build"]
    assert answers["rows"][0]["per_question"][0]["id"] in answers["questions"]["ids"]


def test_a_built_kb_is_reused_only_with_the_same_documents_and_settings(settings, tmp_path, monkeypatch):
    from eval.ablate import build_kb
    from kb.settings import apply_overrides
    from retrieval.knowledge_base import KnowledgeBase
    from tests.conftest import write_files

    docs = tmp_path / "docs"
    write_files(docs, {"a.txt": "First topic sentence. It goes on here. 第二个主题的句子。"})
    first = build_kb(settings, "x", docs, None, False)
    calls = []
    real = KnowledgeBase.add_paths
    monkeypatch.setattr(KnowledgeBase, "add_paths", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    assert build_kb(settings, "x", docs, None, False) == first and calls == []
    fixed = build_kb(apply_overrides(settings, {"chunking.method": "fixed"}), "x", docs, None, False)
    assert calls == [1] and fixed["chunker"] == "fixed" and first["chunker"] != "fixed"
    (docs / "a.txt").write_text("Changed text entirely. Nothing else.", encoding="utf-8")
    build_kb(apply_overrides(settings, {"chunking.method": "fixed"}), "x", docs, None, False)
    assert calls == [1, 1]
    with KnowledgeBase(apply_overrides(settings, {"chunking.method": "fixed"}), "x").store() as store:
        docs_in = store.documents()
        assert len(docs_in) == 1  # rebuilt, not added beside the old text
        assert "Changed" in " ".join(c["text"] for c in store.chunks(docs_in[0].doc_id))


def test_a_row_whose_chunker_did_not_run_is_an_error():
    from eval.ablate import check_chunker

    ref = grid()[0]
    check_chunker(ref, {"kb": "x", "chunker": "nsp (work/x/nsp)"})
    with pytest.raises(ValueError, match="ingestion used 'fixed .not enough pairs.'"):
        check_chunker(ref, {"kb": "x", "chunker": "fixed (not enough pairs)"})
    single = next(r for r in grid() if r.name == "index=single-level")
    check_chunker(single, {"kb": "x", "chunker": "nsp (work/x/nsp) (store copied)"})


def test_question_sample_and_best_rows():
    from eval.ablate_answers import pick_best, sample
    from eval.data import Question

    qs = [Question(str(i), f"q{i}", ["a"], "ctx", {"in_kb": i < 10}) for i in range(15)]
    picked = sample(qs, 4, 2, seed=1)
    assert sum(q.meta["in_kb"] for q in picked) == 4 and len(picked) == 6
    assert [q.id for q in picked] == sorted((q.id for q in picked), key=int)  # file order
    assert [q.id for q in sample(qs, 4, 2, seed=1)] == [q.id for q in picked]
    with pytest.raises(ValueError, match="unanswerable"):
        sample(qs, 4, 6)
    rows = [{"corpus": "long", "row": n, "answer_in_budget": a, "recall@5_strict": s, "mrr": 0.5}
            for n, a, s in [("a", 0.8, 0.9), ("b", 0.9, 0.1), ("c", 0.8, 0.95), ("d", 0.1, 1.0)]]
    assert pick_best({"k": 5, "rows": rows + [{**rows[3], "corpus": "paragraphs", "answer_in_budget": 1.0}]},
                     "long", 3) == ["b", "c", "a"]
