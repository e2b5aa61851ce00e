import json
from collections import Counter

import numpy as np
import pytest

from ingest.nsp import META_FILE, CrossNSPScorer, build_pairs, train_nsp_head


def test_pairs_are_balanced_and_labelled():
    docs = [[["a1", "a2", "a3"], ["a4", "a5"]], [["b1", "b2", "b3"]]]
    pairs = build_pairs(docs, max_pairs=100)
    labels = Counter(p.label for p in pairs)
    assert labels[0] == labels[1] == 5
    for p in pairs:
        if p.label == 0:  # adjacent, same document and section
            assert p.a[0] == p.b[0] and int(p.b[1]) == int(p.a[1]) + 1
        else:  # another document
            assert p.a[0] != p.b[0]


def test_single_document_negatives_are_far_apart():
    doc = [[[f"s{i}" for i in range(12)]]]
    for p in build_pairs(doc, 100, far_gap=4):
        if p.label == 1:
            assert abs(int(p.a[1:]) - int(p.b[1:])) >= 4


def test_train_head_saves_loadable_model_with_new_chinese_chars(tmp_path, tiny_nsp_dir):
    docs = [[["天气很好。", "我们去公园散步。", "公园里有很多人。"]],
            [["股票市场下跌。", "投资者很担心。", "银行利率上升。"]]] * 4
    pairs = build_pairs(docs, 40)
    meta = train_nsp_head(pairs, tiny_nsp_dir, tmp_path / "nsp", epochs=1, batch_size=8,
                          device="cpu", progress=False, heldout=0.25)
    assert meta["added_tokens"] > 0
    assert json.loads((tmp_path / "nsp" / META_FILE).read_text())["pairs"] == len(pairs)
    scorer = CrossNSPScorer(tmp_path / "nsp", device="cpu")
    held = pairs[: meta["heldout_pairs"]]  # the first pairs are held out; label 0 = continues
    guess = np.where(scorer.continue_probs([(p.a, p.b) for p in held]) >= 0.5, 0, 1)
    assert meta["heldout_accuracy"] == pytest.approx(np.mean(guess == [p.label for p in held]), abs=1e-4)
    ids = scorer.tokenizer("股票")["input_ids"]
    assert scorer.tokenizer.unk_token_id not in ids
    assert scorer.continue_probs([("天气很好。", "股票市场下跌。")]).shape == (1,)


def test_pair_head_learns_topic_continuity(tmp_path, minilm_dir):
    from ingest.nsp import load_scorer_from, train_pair_head

    topics = [["The reactor cools with water.", "Water flows through the reactor core.",
               "The core water is then pumped out."],
              ["Bakers knead the dough.", "The dough rests for an hour.", "Then bakers shape the dough into loaves."],
              ["Our sales team meets clients.", "Clients tell the sales team their needs.",
               "The team writes client reports."]] * 3
    pairs = build_pairs([[t] for t in topics], 200)
    meta = train_pair_head(pairs, minilm_dir, tmp_path / "head", device="cpu", progress=False, heldout=0.3)
    assert meta["kind"] == "pair_head" and meta["heldout_accuracy"] >= 0.8
    scorer = load_scorer_from(tmp_path / "head", device="cpu")
    p = scorer.continue_probs([("Bakers knead the dough.", "The dough rests for an hour."),
                               ("Bakers knead the dough.", "Water flows through the reactor core.")])
    assert p[0] > 0.5 > p[1]
