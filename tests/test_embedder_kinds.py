"""Queries and passages: a model with `query` / `passage` prompts (E5) gets them at every call site
and in fine-tuning, a model without them (MiniLM) embeds both alike, and the cache never mixes them.
The packaged MiniLM with prompts added to its config stands in for E5 (fast, no conversion)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.embedder import Embedder, EmbeddingCache

PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["Refunds are paid within five working days.", "员工每年享有十五天带薪年假。"]


@pytest.fixture(scope="session")
def prompted_dir(minilm_dir, tmp_path_factory) -> Path:
    """MiniLM whose sentence-transformers config defines E5's prompts (weights linked, not copied)."""
    out = tmp_path_factory.mktemp("prompted") / "minilm-prompted"
    out.mkdir()
    for item in Path(minilm_dir).iterdir():
        (out / item.name).symlink_to(item)
    cfg_path = out / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.unlink()
    cfg_path.write_text(json.dumps({**cfg, "prompts": PROMPTS}))
    return out


@pytest.fixture(scope="session")
def prompted(prompted_dir) -> Embedder:
    return Embedder(str(prompted_dir), "cpu")


@pytest.fixture(scope="session")
def plain(minilm_dir) -> Embedder:
    return Embedder(str(minilm_dir), "cpu")


def _raw(embedder: Embedder, texts: list[str]) -> np.ndarray:
    return embedder.model.encode(texts, prompt="", normalize_embeddings=True)


def test_each_kind_gets_its_prompt_and_a_model_without_prompts_none(prompted, plain):
    assert prompted.prompts == PROMPTS and plain.prompts == {}
    np.testing.assert_allclose(prompted.encode_queries(TEXTS), _raw(prompted, ["query: " + t for t in TEXTS]),
                               atol=1e-5)
    np.testing.assert_allclose(prompted.encode_passages(TEXTS), _raw(prompted, ["passage: " + t for t in TEXTS]),
                               atol=1e-5)
    assert not np.allclose(prompted.encode_queries(TEXTS), prompted.encode_passages(TEXTS), atol=1e-3)
    np.testing.assert_allclose(plain.encode_queries(TEXTS), _raw(plain, TEXTS), atol=1e-5)
    np.testing.assert_allclose(plain.encode_passages(TEXTS), _raw(plain, TEXTS), atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        plain.encode(TEXTS, "document")


def test_the_cache_keeps_query_and_passage_vectors_apart(prompted, plain, tmp_path):
    assert prompted.cache_id("query") != prompted.cache_id("passage")
    assert plain.cache_id("query") == plain.cache_id("passage") == plain.model_id  # same vectors, old key
    assert "prompts=" in prompted.model_id and "prompts=" not in plain.model_id
    db = tmp_path / "emb.sqlite"
    passages = EmbeddingCache(db, prompted.cache_id("passage"))
    p = passages.embed(prompted, TEXTS, "passage")
    queries = EmbeddingCache(db, prompted.cache_id("query"))
    q = queries.embed(prompted, TEXTS, "query")
    assert queries.misses == len(TEXTS) and queries.hits == 0  # not served from the passage vectors
    np.testing.assert_allclose(q, prompted.encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(passages.embed(prompted, TEXTS, "passage"), p)
    assert passages.hits == len(TEXTS)
    with pytest.raises(ValueError, match="holds"):
        passages.embed(prompted, TEXTS, "query")
    passages.close()
    queries.close()


def test_a_kb_embeds_its_entries_as_passages_and_searches_with_queries(settings, prompted_dir, tmp_path, monkeypatch):
    from ingest.pipeline import FileItem, doc_id_for
    from retrieval.knowledge_base import KnowledgeBase

    settings.models.embedder = str(prompted_dir)
    kinds: list[str] = []
    orig = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, texts, kind, progress=False:
                        kinds.append(kind) or orig(self, texts, kind, progress))
    doc = tmp_path / "refunds.md"
    doc.write_text("# Refunds\n\nRefunds are paid to the original card within five working days.", encoding="utf-8")
    kb = KnowledgeBase(settings, "kinds", create=True)
    kb.add_items([FileItem(doc, doc.name, doc_id_for(str(doc.resolve())))], progress=False)
    assert kinds and set(kinds) == {"passage"}
    kinds.clear()
    assert kb.search("when is my refund paid", 1)[0].source == "refunds.md"
    assert kinds == ["query"]


class _Recorder:
    """An embedder that records the kind of every call."""

    dim = 4

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def encode(self, texts, kind, progress=False):
        self.calls.append((kind, len(texts)))
        rng = np.random.default_rng(len(texts))
        v = rng.normal(size=(len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_queries(self, texts, progress=False):
        return self.encode(texts, "query", progress)

    def encode_passages(self, texts, progress=False):
        return self.encode(texts, "passage", progress)


def test_choice_embeds_questions_as_queries_and_options_as_passages():
    from eval.choice import ChoiceItem, embed_scores

    rec = _Recorder()
    items = [ChoiceItem("s", 1, "问题？", {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}, "A")]
    assert embed_scores(rec, items).shape == (1, 4)
    assert rec.calls == [("query", 1), ("passage", 4)]


def test_compliance_compares_answers_and_replies_as_one_kind():
    from serve.compliance import SIMILARITY_KIND, ApprovedReply, ReplyLibrary

    rec = _Recorder()
    lib = ReplyLibrary([ApprovedReply("We will get back to you."), ApprovedReply("请联系客服。")], rec)
    lib.nearest("an answer")
    assert rec.calls == [(SIMILARITY_KIND, 2), (SIMILARITY_KIND, 1)]


def test_embed_fine_tuning_feeds_the_model_what_the_embedder_feeds_it(settings, prompted, prompted_dir, tmp_path,
                                                                       monkeypatch):
    """Training texts carry the same prompts as run-time embedding, and the result keeps them."""
    from finetune.embed import finetune_embedder

    rows = [{"query": f"question {i}?", "pos": f"answer number {i}.", "neg": [f"other text {i}."]} for i in range(6)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    ft = settings.finetune
    ft.embed_batch_size, ft.embed_add_chars, ft.embed_max_length, ft.embed_method = 6, False, 32, "full"
    seen: list[str] = []
    module = type(prompted.model[0])
    orig = module.preprocess
    monkeypatch.setattr(module, "preprocess", lambda self, inputs, prompt=None, **kw:
                        seen.extend((prompt or "") + t for t in inputs) or orig(self, inputs, prompt=prompt, **kw))
    finetune_embedder(settings, data, tmp_path / "out", model=str(prompted_dir), progress=False, max_steps=1)
    trained = set(seen)
    assert {"query: " + r["query"] for r in rows} <= trained and {"passage: " + r["pos"] for r in rows} <= trained
    assert {"passage: " + r["neg"][0] for r in rows} <= trained
    assert all(t.startswith(("query: ", "passage: ")) for t in trained)
    seen.clear()
    tuned = Embedder(str(tmp_path / "out"), "cpu")
    assert tuned.prompts == PROMPTS
    tuned.encode_queries([r["query"] for r in rows])
    tuned.encode_passages([r["pos"] for r in rows])
    ran = set(seen) - set(PROMPTS.values())  # sentence-transformers also tokenizes a prompt alone (its length)
    assert ran == {"query: " + r["query"] for r in rows} | {"passage: " + r["pos"] for r in rows}


def test_embed_lora_gets_the_configured_rank_alpha_and_dropout(settings):
    from finetune.embed import lora_config

    settings.finetune.lora.r, settings.finetune.lora.alpha, settings.finetune.lora.dropout = 4, 12, 0.2
    lc = lora_config(settings.finetune, True)
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (4, 12, 0.2)
    assert set(lc.target_modules) == {"query", "key", "value", "dense"} and "word_embeddings" in lc.modules_to_save
    assert lora_config(settings.finetune, False).modules_to_save is None
