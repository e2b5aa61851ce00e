"""Cross-encoders on tiny random-weight encoders: the shipped-asset round trip (base + LoRA +
head merged into a plain folder), the NSP scorer and the reranker reading such folders."""

import json

import numpy as np
import pytest
import torch

from kb.cross_encoder import (
    IDENTITY,
    SIGMOID,
    add_lora,
    build_cross_encoder,
    load_classifier,
    lora_targets,
    read_meta,
    save_asset,
)


def _encoder(out, tok, kind: str):
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    size = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=256)
    if kind == "xlmr":  # e5-small's family (the packaged BERT tokenizer gives 2 token types)
        model = XLMRobertaModel(XLMRobertaConfig(vocab_size=tok.vocab_size, pad_token_id=0, type_vocab_size=2,
                                                 **size))
    else:
        model = BertModel(BertConfig(vocab_size=tok.vocab_size, **size))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=["xlmr", "bert"])
def tiny_encoder(request, tmp_path_factory, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    return _encoder(tmp_path_factory.mktemp(f"enc_{request.param}"), tok, request.param)


def _asset(base, out, num_labels, activation, labels=None):
    """A LoRA adapter + head with non-zero random weights (an untrained LoRA is the identity)."""
    torch.manual_seed(1)
    model = add_lora(load_classifier(base, num_labels, labels), r=4, alpha=8, top_layers=2)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    model.eval()
    save_asset(model, out, {"num_labels": num_labels, "max_length": 64, "activation_fn": activation,
                            "id2label": labels or {}, "base": str(base)})
    return model


PAIRS = [("天气很好。", "我们去公园散步。"), ("Refunds take five days.", "Passwords need twelve characters."),
         ("股票市场下跌。", "投资者很担心。")]


def _logits(model, tok, pairs):
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def test_lora_targets_only_the_top_layers():
    rx = lora_targets(12, 4)
    import re

    assert re.fullmatch(rx, "roberta.encoder.layer.11.attention.self.query")
    assert re.fullmatch(rx, "bert.encoder.layer.8.output.dense")
    assert not re.fullmatch(rx, "roberta.encoder.layer.7.attention.self.query")
    assert not re.fullmatch(rx, "classifier.dense")


def test_built_folder_gives_the_logits_of_base_plus_adapter(tiny_encoder, tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    peft_model = _asset(tiny_encoder, tmp_path / "asset", 1, SIGMOID)
    expected = _logits(peft_model, tok, PAIRS)
    assert np.abs(expected).max() > 1e-3
    plain = _logits(load_classifier(tiny_encoder, 1), tok, PAIRS)
    assert not np.allclose(plain, expected, atol=1e-4)  # the adapter changes the model
    assert sum(f.stat().st_size for f in (tmp_path / "asset").iterdir()) < 2_000_000
    build_cross_encoder(tiny_encoder, tmp_path / "asset", tmp_path / "out")
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    np.testing.assert_allclose(_logits(merged, tok, PAIRS), expected, atol=1e-4)
    ce = CrossEncoder(str(tmp_path / "out"), device="cpu")
    np.testing.assert_allclose(ce.predict(PAIRS), 1 / (1 + np.exp(-expected[:, 0])), atol=1e-4)
    assert ce.max_seq_length == 64 and read_meta(tmp_path / "out")["num_labels"] == 1
    assert not list(tmp_path.glob(".out.*"))  # the temporary folder was renamed into place


def test_asset_needs_its_meta_and_base_label_count(tiny_encoder, tmp_path):
    from kb.cross_encoder import CrossEncoderError

    with pytest.raises(CrossEncoderError, match="not a cross-encoder asset"):
        build_cross_encoder(tiny_encoder, tmp_path, tmp_path / "out")
    _asset(tiny_encoder, tmp_path / "a", 2, IDENTITY)
    build_cross_encoder(tiny_encoder, tmp_path / "a", tmp_path / "two")
    with pytest.raises(CrossEncoderError, match="2 labels"):
        load_classifier(tmp_path / "two", 1)


def test_nsp_scorer_reads_a_sequence_classifier_and_its_label_names(tiny_encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ingest.nsp import CrossNSPScorer, continuation_prob

    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    _asset(tiny_encoder, tmp_path / "fwd", 2, IDENTITY, {0: "continues", 1: "not_next"})
    _asset(tiny_encoder, tmp_path / "rev", 2, IDENTITY, {0: "not_next", 1: "continues"})
    for name in ("fwd", "rev"):
        build_cross_encoder(tiny_encoder, tmp_path / name, tmp_path / f"{name}_out")
    raw = _logits(AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rev_out")).eval(), tok, PAIRS)
    rev = CrossNSPScorer(tmp_path / "rev_out", device="cpu", batch_size=2)
    np.testing.assert_allclose(rev.logits(PAIRS), raw[:, ::-1], atol=1e-4)  # column 0 = continues
    np.testing.assert_allclose(rev.continue_probs(PAIRS), continuation_prob(raw[:, ::-1]), atol=1e-5)
    fwd = CrossNSPScorer(tmp_path / "fwd_out", device="cpu")
    raw = _logits(AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "fwd_out")).eval(), tok, PAIRS)
    np.testing.assert_allclose(fwd.logits(PAIRS), raw, atol=1e-4)
    # the asset folder itself loads too (merged onto the base its meta names)
    np.testing.assert_allclose(CrossNSPScorer(tmp_path / "fwd", device="cpu").logits(PAIRS), raw, atol=1e-4)


def test_train_cross_nsp_learns_and_its_folder_is_a_scorer(tiny_encoder, tmp_path):
    from ingest.nsp import META_FILE, build_pairs, load_scorer_from
    from ingest.nsp_cross import train_cross_nsp
    from kb.cross_train import FitConfig

    docs = [[["天气很好。", "我们去公园散步。", "公园里有很多人。"]],
            [["股票市场下跌。", "投资者很担心。", "银行利率上升。"]]] * 4
    pairs = build_pairs(docs, 40)
    meta = train_cross_nsp(pairs, tiny_encoder, tmp_path / "nsp", base_spec=str(tiny_encoder), device="cpu",
                           fit_cfg=FitConfig(epochs=3, batch_size=8, max_length=32, precision="fp32"),
                           lora_r=4, top_layers=2, heldout=0.25, progress=False)
    assert meta["kind"] == "cross" and meta["steps"] == 9
    assert meta["final_loss"] < meta["first_loss"] + 0.5
    assert json.loads((tmp_path / "nsp" / META_FILE).read_text())["base"] == str(tiny_encoder)
    scorer = load_scorer_from(tmp_path / "nsp", device="cpu")
    assert scorer.kind == "cross"
    held = pairs[: meta["heldout_pairs"]]  # the first pairs are held out; label 0 = continues
    guess = np.where(scorer.continue_probs([(p.a, p.b) for p in held]) >= 0.5, 0, 1)
    assert meta["heldout_accuracy"] == pytest.approx(np.mean(guess == [p.label for p in held]), abs=1e-4)
    probs = scorer.continue_probs(PAIRS)
    build_cross_encoder(tiny_encoder, tmp_path / "nsp", tmp_path / "merged")
    np.testing.assert_allclose(load_scorer_from(tmp_path / "merged", device="cpu").continue_probs(PAIRS), probs,
                               atol=1e-5)


def test_hard_negatives_come_from_other_sections_or_neighbours():
    from ingest.nsp import build_pairs

    docs = [[["a0", "a1", "a2"], ["a3", "a4"]], [["b0", "b1", "b2"]], [["c0", "c1", "c2"]]]
    pairs = build_pairs(docs, 100, hard=1.0, neighbours={1: [2], 2: [1]})
    negatives = [p for p in pairs if p.label == 1]
    assert len(negatives) == sum(p.label == 0 for p in pairs) == 7
    for p in negatives:
        if p.a[0] == "a":  # another section of the same document
            assert p.b[0] == "a" and (int(p.a[1]) < 3) != (int(p.b[1]) < 3)
        else:  # the neighbour document
            assert {p.a[0], p.b[0]} == {"b", "c"}


def test_train_nsp_kind_cross_adapts_the_configured_cross_encoder(tiny_encoder, tmp_path, monkeypatch):
    from ingest.pipeline import load_scorer, train_kb_nsp
    from kb.settings import load_settings

    _asset(tiny_encoder, tmp_path / "asset", 2, IDENTITY, {0: "continues", 1: "not_next"})
    build_cross_encoder(tiny_encoder, tmp_path / "asset", tmp_path / "nsp-model")
    monkeypatch.setenv("KB_HOME", str(tmp_path / "home"))
    s = load_settings(None, **{"models.nsp": str(tmp_path / "nsp-model"), "models.device": "cpu",
                               "nsp_train.kind": "cross", "nsp_train.batch_size": 4, "nsp_train.lora_r": 2,
                               "nsp_train.train_layers": 1, "nsp_train.min_pairs": 4})
    before = load_scorer(s, "k")
    assert before.model_dir == tmp_path / "nsp-model"  # nothing adapted yet: the configured model
    docs = [[["天气很好。", "我们去公园散步。", "公园里有很多人。"]],
            [["股票市场下跌。", "投资者很担心。", "银行利率上升。"]]] * 3
    meta = train_kb_nsp(s, "k", docs, progress=False)
    assert meta["adapted_from"] == str(tmp_path / "nsp-model") and meta["lora_r"] == 2 and meta["top_layers"] == 1
    assert meta["config"]["batch_size"] == 4  # nsp_train values reach the training loop
    after = load_scorer(s, "k")
    assert after.model_dir == s.kb_dir("k") / "nsp" and after.kind == "cross"
    # another configured model: the KB's adaptation of the old one no longer applies
    other = load_settings(None, **{"models.nsp": str(tiny_encoder.parent), "models.device": "cpu"})
    monkeypatch.setattr("ingest.pipeline.load_scorer_from", lambda path, *a: path)
    assert load_scorer(other, "k") == tiny_encoder.parent
