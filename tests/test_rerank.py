"""The reranker on a tiny random-weight cross-encoder built like the shipped one: the KB's search
reaches it with the configured candidates, and `kb finetune rerank` trains one from query/pos/neg rows."""

import json

import numpy as np
import pytest
import torch

from kb.cross_encoder import SIGMOID, add_lora, build_cross_encoder, load_classifier, save_asset
from retrieval.knowledge_base import KnowledgeBase
from tests.conftest import write_files

DOCS = {
    "refunds.md": "# Refund policy\n\nCustomers can return a product within 30 days for a full refund.",
    "shipping.md": "# Shipping\n\nOrders above 50 euros ship for free. Express delivery takes one day.",
    "security.md": "# Passwords\n\nStaff must change their password every 90 days.",
    "leave.txt": "年假政策\n\n员工每年享有十五天带薪年假。年假需要提前两周向主管申请。",
    "travel.txt": "差旅报销\n\n出差的交通和住宿费用凭发票报销。",
}


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory, minilm_dir):
    """A tiny XLM-R encoder + a random LoRA/head asset, merged as `kb models install` does."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    root = tmp_path_factory.mktemp("rerank")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    XLMRobertaModel(XLMRobertaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                                     pad_token_id=0, type_vocab_size=2)).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    model = add_lora(load_classifier(root / "base", 1), r=4, alpha=8, top_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    save_asset(model, root / "asset", {"num_labels": 1, "max_length": 64, "activation_fn": SIGMOID})
    build_cross_encoder(root / "base", root / "asset", root / "rerank")
    return root


@pytest.fixture()
def kb(settings, tmp_path):
    k = KnowledgeBase(settings, "t", create=True)
    k.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    return k


def _with(settings, **retrieval):
    return settings.model_copy(update={"retrieval": settings.retrieval.model_copy(update=retrieval)})


def test_search_reranks_the_configured_candidates_with_sigmoid_scores(kb, tiny_reranker, monkeypatch):
    from sentence_transformers import CrossEncoder

    from retrieval import knowledge_base as kb_module

    kb_module.shared_reranker.cache_clear()
    seen = []
    real = CrossEncoder.predict

    def spy(self, pairs, *a, **kw):
        seen.append(len(pairs))
        return real(self, pairs, *a, **kw)

    monkeypatch.setattr(CrossEncoder, "predict", spy)
    s = kb.settings.model_copy(update={"models": kb.settings.models.model_copy(
        update={"reranker": str(tiny_reranker / "rerank"), "device": "cpu"})})
    for n in (2, 3):
        hits = KnowledgeBase(_with(s, rerank_candidates=n, candidates=10), "t").search("refund days", 5)
        assert seen[-1] == n and len(hits) == n  # the configured candidates reach the reranker
        scores = [h.score for h in hits]
        assert all(0 < x < 1 for x in scores) and scores == sorted(scores, reverse=True)
        assert all(h.key_info["rerank_score"] == h.score for h in hits)
    ce = CrossEncoder(str(tiny_reranker / "rerank"), device="cpu")
    np.testing.assert_allclose([h.score for h in hits], ce.predict([("refund days", h.text) for h in hits]), atol=1e-5)
    calls = len(seen)
    KnowledgeBase(_with(s, rerank=False), "t").search("refund days", 5)
    assert len(seen) == calls  # retrieval.rerank: false turns it off
    kb_module.shared_reranker.cache_clear()


def test_groups_from_rows_need_enough_negatives():
    from finetune.rerank import groups_from_rows

    rows = [{"query": "q1", "pos": ["p1"], "neg": ["n1", "n2"]}, {"query": "q2", "pos": "p2", "neg": ["n3"]},
            {"query": "", "pos": ["p3"], "neg": ["a", "b"]}]
    groups, skipped = groups_from_rows(rows, 2)
    assert groups == [("q1", ["p1", "n1", "n2"])] and skipped == 2


def test_finetune_rerank_cli_writes_a_cross_encoder_folder(tiny_reranker, tmp_path, monkeypatch):
    from sentence_transformers import CrossEncoder

    from cli import main

    rows = [{"query": f"问题{i}是什么", "pos": [f"答案{i}在这里。"], "neg": [f"无关{i}。", f"别的{i}。", "其他。"]}
            for i in range(12)]
    data = tmp_path / "train.embed.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setenv("KB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KB_MODELS__DEVICE", "cpu")
    monkeypatch.setenv("KB_FINETUNE__RERANK_BATCH_SIZE", "3")
    monkeypatch.setenv("KB_FINETUNE__RERANK_NEGATIVES", "2")
    out = tmp_path / "rr"
    assert main(["finetune", "rerank", "--data", str(data), "--out", str(out), "--model",
                 str(tiny_reranker / "rerank"), "--max-steps", "2", "--json", "-q"]) == 0
    meta = json.loads((out / "cross_encoder.json").read_text())
    assert meta["steps"] == 2 and meta["negatives_per_group"] == 2  # the configured values arrived
    assert meta["config"]["batch_size"] == 3
    ce = CrossEncoder(str(out), device="cpu")
    assert ce.predict([("问题1是什么", "答案1在这里。")]).shape == (1,)
    assert main(["finetune", "rerank", "--data", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
