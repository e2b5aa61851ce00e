"""bench/finetune.py's own arithmetic and its loss check: the FLOPs formula by hand, and a first
loss that depends on which positions are labelled (so agreeing sides computed the same objective)."""

from __future__ import annotations

import pytest
import torch

from bench.finetune import build, flops_per_token, shares
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
