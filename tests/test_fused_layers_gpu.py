"""On a CUDA GPU: compiled layers replayed as CUDA graphs (finetune.compile = graphs) train exactly
as the compiled layers without them, with gradient accumulation too (a graph's output gradient
must not be overwritten by the next micro-batch's replay). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(mode: str, grad_accum: int, tmp_path):
    from bench.finetune import Tok, build, examples
    from finetune.sft import train
    from kb.settings import FinetuneConfig

    model = build("0.5b", "all-linear", 8, num_hidden_layers=3)
    exs = examples(4 * 2 * grad_accum, model.config.vocab_size, "full", 256)
    cfg = FinetuneConfig(batch_size=2, grad_accum=grad_accum, max_length=256, logging_steps=1, learning_rate=1e-3,
                         compile=mode, fused_layers="on", warmup_ratio=0.0, save_steps=10**9)
    res = train(model, Tok(), exs, cfg, tmp_path / f"{mode}{grad_accum}", method="lora", prec="bf16", max_steps=4,
                save=False, progress=False)
    lora = {n: p.detach().float().cpu() for n, p in model.named_parameters() if "lora_" in n}
    return res, lora


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_graphs_train_as_the_compiled_layers(tmp_path, grad_accum):
    ref, ref_w = _train("on", grad_accum, tmp_path)
    got, got_w = _train("graphs", grad_accum, tmp_path)
    assert got.kernels["cuda_graphs"] and got.kernels["fused_layer_calls"] == ref.kernels["fused_layer_calls"]
    assert got.first_loss == pytest.approx(ref.first_loss, rel=2e-3)
    assert got.train_loss == pytest.approx(ref.train_loss, rel=5e-3)
    for name, w in ref_w.items():
        torch.testing.assert_close(got_w[name], w, atol=2e-3, rtol=2e-2, msg=name)
