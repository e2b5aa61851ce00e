"""bench/finetune.py's own arithmetic and its loss check: the FLOPs formula by hand, and a first
loss that depends on which positions are labelled (so agreeing sides computed the same objective)."""

from __future__ import annotations

import pytest
import torch

from bench.finetune import build, busy_share, flops_per_token, gap_ops, idle_gaps, shares
from finetune.sft import IGNORE, Example


def test_flops_per_token_by_hand():
    p = {"all": 1000, "head": 100, "in_layers": 800, "down": 300, "layers": 2, "d_model": 4}
    attn = 2 * 2 * 10 * 4
    assert flops_per_token(p, 10, 0.25) == 4 * 900 + 4 * 100 * 0.25 + 3 * attn
    assert flops_per_token(p, 10, 1.0, 500, True) == 4 * 900 + 4 * 100 + 3 * attn + 2 * 500 + attn
    exs = [Example([1] * 4, [IGNORE] * 2 + [5, 6]), Example([1] * 2, [IGNORE, 7])]
    attn_len, labelled = shares(exs)
    assert attn_len == pytest.approx((16 + 4) / 6) and labelled == pytest.approx(3 / 6)


def test_the_bench_model_loss_depends_on_the_labelled_positions():
    model = build("", "all-linear", 4, device="cpu", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512).float()
    ids = torch.randint(10, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    replies = ids.clone()
    replies[:, :48] = IGNORE
    with torch.no_grad():
        on_replies = model(input_ids=ids, labels=replies).loss.item()
        on_all = model(input_ids=ids, labels=ids).loss.item()
        shifted = model(input_ids=ids, labels=torch.roll(replies, 1, dims=1)).loss.item()
    assert on_replies > torch.log(torch.tensor(512.0)).item() + 2  # spread logits: far from ln(vocab)
    # a side that took the loss elsewhere would differ by far more than the 0.1% that agreeing sides show
    assert abs(on_all - on_replies) / on_replies > 0.005 and abs(shifted - on_replies) / on_replies > 0.005


def test_gpu_busy_share_merges_overlaps_and_finds_the_gaps():
    """The busy share counts overlapping kernels and copies once; the gaps are the idle time between
    them, longest first, placed from the first GPU event; CPU events are not GPU time, and the gap's
    report names the CPU operators in it and the last sync before it. Here: busy 100-115 (two
    overlapping kernels), a 5 us gap, a copy, a 2,000 us gap, a kernel."""
    ev = [{"ph": "X", "cat": "kernel", "name": "k", "ts": 100, "dur": 10},
          {"ph": "X", "cat": "kernel", "name": "k", "ts": 105, "dur": 10},
          {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 120, "dur": 5},
          {"ph": "X", "cat": "kernel", "name": "k", "ts": 2125, "dur": 75},
          {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 90, "dur": 30},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 110, "dur": 14},
          {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 500, "dur": 30}]
    found = idle_gaps({"traceEvents": ev})
    assert found == (15 + 5 + 75, 100, [(5, 115), (2000, 125)])
    share = busy_share(found, wall_us=4000)
    assert share["gpu_busy_share"] == pytest.approx(95 / 4000, abs=1e-4) and share["wall_ms"] == 4.0
    assert share["idle_gaps_ms"] == [[2.0, 0.0], [0.01, 0.0]]
    longest = gap_ops({"traceEvents": ev}, found)[0]
    assert longest["gap_ms"] == 2.0 and [c[0] for c in longest["cpu"]] == ["aten::copy_"]
    assert longest["last_sync"][0] == "cudaStreamSynchronize"
    assert busy_share((0.0, 0.0, []), 10.0) == {"gpu_busy_share": None}
