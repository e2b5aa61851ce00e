"""The fused decoder-layer forward computes what transformers computes: outputs and LoRA
gradients, with and without recomputation, for plain and packed rows, Qwen2 and Llama."""

from __future__ import annotations

import pytest
import torch

from finetune.fused_layers import install, unsupported


def _model(arch: str, dropout: float = 0.0, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64, attn_implementation="sdpa")
    base = Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules="all-linear"))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # zero at init would hide a wrong LoRA path
    model.config.use_cache = False
    return model.train()


def _run(model, ids, pos):
    out = model(input_ids=ids, position_ids=pos, use_cache=False)
    loss = out.logits.float().logsumexp(-1).mean() - out.logits[..., 0].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_layers_match_transformers(arch, packed, recompute):
    model = _model(arch)
    ids = torch.randint(3, 128, (2, 24))
    pos = torch.arange(24).repeat(2, 1)
    if packed:  # row 0 holds two examples: positions restart, so transformers masks across them
        pos[0, 10:] = torch.arange(14)
    ref_logits, ref_grads = _run(model, ids, pos)
    assert install(model, recompute=recompute, compile=False) == 2
    logits, grads = _run(model, ids, pos)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    model.eval()  # inference takes the original forward
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, ref_logits, atol=2e-5, rtol=1e-4)


def test_unsupported_layers_keep_the_transformers_forward():
    model = _model("qwen2", dropout=0.1)
    layer = model.get_base_model().model.layers[0]
    assert "dropout" in unsupported(layer)
    assert install(model, recompute=False, compile=False) == 0
    assert not hasattr(layer, "_unfused_forward")


def test_training_with_fused_layers_reports_them_and_the_same_first_loss(tmp_path):
    from finetune.sft import Example, train
    from kb.settings import FinetuneConfig

    class Tok:
        pad_token_id, eos_token_id, eos_token, pad_token = 0, 1, "<pad>", "<pad>"

    g = torch.Generator().manual_seed(0)
    exs = [Example(ids, [-100] * 8 + ids[8:]) for ids in (torch.randint(3, 128, (16,), generator=g).tolist()
                                                          for _ in range(8))]
    results = {}
    for mode in ("on", "off"):
        cfg = FinetuneConfig(batch_size=2, grad_accum=1, max_length=32, logging_steps=1, learning_rate=1e-3,
                             compile="off", fused_layers=mode, gradient_checkpointing=True, precision="fp32")
        results[mode] = train(_model("qwen2"), Tok(), exs, cfg, tmp_path / mode, method="lora", prec="fp32",
                              max_steps=2, save=False, progress=False)
    assert results["on"].kernels["fused_layers"] == 2 and results["off"].kernels["fused_layers"] == 0
    assert results["on"].first_loss == pytest.approx(results["off"].first_loss, rel=1e-5)
    assert results["on"].train_loss == pytest.approx(results["off"].train_loss, rel=1e-4)
