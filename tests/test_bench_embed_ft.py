"""bench/embed_finetune.py: the project's embedder fine-tune and sentence-transformers' trainer
compute the same first-step loss on the same batch (tiny random shape, CPU, no dropout)."""

from __future__ import annotations

import math

import pytest


def _args(**kw):
    from bench.embed_finetune import parse_args

    return parse_args(["--shapes", "tiny", "--n", "48", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                       "--max-seq-length", "48", "--dropout", "0", "--device", "cpu", "--name", "",
                       *kw.get("extra", [])])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bench.embed_finetune import build_model, char_tokenizer, synthetic_triples

    args = _args()
    rows = synthetic_triples(args.n, 0)
    tok = char_tokenizer([t for r in rows for t in (r["query"], r["pos"][0], r["neg"][0])], 4000)
    return build_model("tiny", tok, tmp_path_factory.mktemp("st"), args.max_seq_length, 0.0, 0), rows, args


def test_project_first_loss_is_the_mnrl_loss_of_its_first_batch(tiny):
    """Without the trainer: the project's reported first loss equals MultipleNegativesRankingLoss
    computed by hand on the first batch, with the prompts, from the same weights."""
    import torch
    from sentence_transformers import SentenceTransformer

    from bench.embed_finetune import PROMPTS, run_project

    folder, rows, args = tiny
    plan = [rows[i:i + 8] for i in range(0, 24, 8)]
    got = run_project(folder, rows, args, "cpu", "full", plan)
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    st = SentenceTransformer(str(folder), device="cpu")
    st.max_seq_length = args.max_seq_length
    cols = [[PROMPTS["query"] + r["query"] for r in plan[0]], [PROMPTS["passage"] + r["pos"][0] for r in plan[0]],
            [PROMPTS["passage"] + r["neg"][0] for r in plan[0]]]
    with torch.no_grad():
        want = MultipleNegativesRankingLoss(st)([st.tokenize(c) for c in cols], None).item()
    assert got["steps"] == 3 and got["examples_per_step"] == 8
    assert math.isclose(got["first_loss"], want, rel_tol=1e-5)
    assert want > 0.5  # a real objective, not a constant


@pytest.mark.slow
@pytest.mark.parametrize("method,workers", [("full", 0), ("full", 2), ("lora", 2)])
def test_both_sides_agree_on_the_first_step_loss(tiny, method, workers):
    """The trainer (NO_DUPLICATES batches, recorded from its batch sampler in the main process
    while `workers` DataLoader workers collate) and the project on those batches: same first loss,
    with the same workers and SDPA attention on both sides."""
    pytest.importorskip("datasets")
    from bench.embed_finetune import compare

    folder, rows, _ = tiny
    args = _args(extra=["--workers", str(workers)])
    row = compare("tiny", method, folder, rows, args, "cpu")
    for side in ("baseline", "project"):
        assert row[side]["steps"] == 3, row
        assert row[side]["workers"] == workers, row
        assert row[side]["prefetch_factor"] == (4 if workers else None), row
        assert row[side]["attn_implementation"] == "sdpa", row
    assert row["first_loss_rel_diff"] < 1e-5, row
