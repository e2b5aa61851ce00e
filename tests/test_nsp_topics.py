"""Must-show: an NSP head trained on real text (CMRC 2018 paragraphs) splits a text of two
unrelated topics between them and keeps each topic whole."""

import json

import pytest

from ingest.chunking import NSPChunker, to_units
from ingest.nsp import build_pairs, load_scorer_from, train_pair_head
from ingest.sentences import split_sentences
from ingest.types import Block, ParsedDocument
from kb.settings import load_settings
from tests.conftest import CMRC

GREAT_WALL = ("长城是中国古代修建的军事防御工程。长城的修建前后持续了两千多年。"
              "明朝时期长城被大规模重修，今天看到的长城大多是明长城。八达岭长城是游客最多的一段长城。")
COFFEE = ("咖啡树是一种热带常绿灌木。咖啡树的果实成熟后呈红色，里面的种子就是咖啡豆。"
          "咖啡豆经过烘焙后才能研磨冲泡。埃塞俄比亚被认为是咖啡的发源地。")
ENGLISH = ("The Great Wall of China was built over many centuries. Most of the wall that stands today was "
           "rebuilt during the Ming dynasty. The Ming wall stretches for thousands of kilometres. "
           "Coffee plants grow best in tropical highlands. Ripe coffee cherries are picked by hand. "
           "The coffee beans inside the cherries are dried and roasted.")


@pytest.fixture(scope="module")
def cmrc_head(tmp_path_factory, minilm_dir):
    if not CMRC.is_file():
        pytest.skip(f"{CMRC} not found")
    data = json.loads(CMRC.read_text(encoding="utf-8"))
    docs = [[split_sentences(p["context"])] for art in data["data"] for p in art["paragraphs"]]
    out = tmp_path_factory.mktemp("cmrc_nsp") / "nsp"
    meta = train_pair_head(build_pairs(docs, 5000), minilm_dir, out, device="cpu", progress=False)
    assert meta["heldout_accuracy"] >= 0.75, meta  # a real, better-than-chance head
    return load_scorer_from(out, device="cpu")


def _chunks(scorer, text):
    doc = ParsedDocument("p", "s", "d", "h", [Block(text)])
    chunker = NSPChunker(scorer, threshold=load_settings().chunking.threshold, max_chars=600, min_chars=0)
    (chunks,) = chunker.chunk_many([to_units(doc)])
    return [c.text for c in chunks]


@pytest.mark.slow
def test_two_chinese_topics_split_between_and_stay_whole(cmrc_head):
    assert _chunks(cmrc_head, GREAT_WALL + COFFEE) == [GREAT_WALL, COFFEE]


@pytest.mark.slow
def test_two_english_topics_split_between_and_stay_whole(cmrc_head):
    chunks = _chunks(cmrc_head, ENGLISH)
    assert len(chunks) == 2
    assert chunks[0].startswith("The Great Wall") and chunks[0].endswith("thousands of kilometres.")
    assert chunks[1].startswith("Coffee plants")
