"""The fused decoder-layer forward computes what transformers computes: outputs and LoRA
gradients, with and without recomputation, for plain and packed rows, Qwen2 and Llama."""

from __future__ import annotations

import pytest
import torch

import finetune.fused_layers as fl
from finetune.fused_layers import calls, install, unsupported

ARCHS = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
         "mistral": ("MistralConfig", "MistralForCausalLM")}


def _model(arch: str, dropout: float = 0.0, seed: int = 0, **extra):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64, attn_implementation="sdpa", **extra)
    config_cls, model_cls = (getattr(transformers, name) for name in ARCHS[arch])
    base = model_cls(config_cls(**kw))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules="all-linear"))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # zero at init would hide a wrong LoRA path
    model.config.use_cache = False
    return model.train()


def _run(model, ids, pos, mask=None):
    out = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    loss = out.logits.float().logsumexp(-1).mean() - out.logits[..., 0].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("rows", ["plain", "packed", "padded"])
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_layers_match_transformers(arch, rows, recompute):
    model = _model(arch)
    ids = torch.randint(3, 128, (2, 24))
    pos = torch.arange(24).repeat(2, 1)
    mask = None
    if rows == "packed":  # row 0 holds two examples: positions restart, so transformers masks across them
        pos[0, 10:] = torch.arange(14)
    if rows == "padded":  # as PaddedCollator makes them: row 1 right-padded after 15 tokens
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, 15:] = 0
    ref_logits, ref_grads = _run(model, ids, pos, mask)
    assert install(model, recompute=recompute, compile=False) == 2
    logits, grads = _run(model, ids, pos, mask)
    assert calls(model) == 2  # the fused forward ran in both layers, not the fallback
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert set(grads) == set(ref_grads) and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    model.eval()  # inference takes the original forward
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, position_ids=pos, attention_mask=mask).logits, ref_logits,
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("kind", "reason"), [("lora_dropout", "LoRA dropout"),
                                               ("attention_dropout", "attention dropout"),
                                               ("eager", "attention implementation")])
def test_unsupported_layers_keep_the_transformers_forward(kind, reason):
    extra = {"attention_dropout": 0.5} if kind == "attention_dropout" else {}
    model = _model("qwen2", dropout=0.1 if kind == "lora_dropout" else 0.0, **extra)
    if kind == "eager":
        model.get_base_model().config._attn_implementation = "eager"
    layer = model.get_base_model().model.layers[0]
    assert reason in unsupported(layer)
    assert install(model, recompute=False, compile=False) == 0
    assert not hasattr(layer, "_unfused_forward")


def test_compiled_layers_take_many_widths_and_match(monkeypatch):
    """torch.compile's graph (the eager backend: same capture, no code generation) over more widths
    than dynamo's recompile limit, with recomputation: no error, same outputs as transformers."""
    monkeypatch.setattr(fl, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(fl, "_COMPILED", {})
    model = _model("qwen2")
    reference = _model("qwen2")
    install(model, recompute=True, compile=True)
    for width in range(6, 18):
        ids = torch.randint(3, 128, (2, width))
        pos = torch.arange(width).repeat(2, 1)
        logits, grads = _run(model, ids, pos)
        ref_logits, ref_grads = _run(reference, ids, pos)
        torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
        name = next(iter(ref_grads))
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4)
    assert calls(model) == 2 * 12


def test_the_fallback_keeps_checkpointing(monkeypatch):
    """A call the fused forward cannot take (here a float mask) runs transformers' forward, still
    checkpointed when recomputation was asked for."""
    model = _model("qwen2")
    install(model, recompute=True, compile=False)
    seen = []
    monkeypatch.setattr(fl, "checkpoint", lambda fn, *a, **kw: seen.append(fn) or fn(*a, **{k: v for k, v in kw.items()
                                                                                            if k != "use_reentrant"}))
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, 5, 64)
    cos, sin = model.get_base_model().model.rotary_emb(x, torch.arange(5)[None])
    layer(x, attention_mask=torch.zeros(1, 1, 5, 5), position_embeddings=(cos, sin))
    assert seen == [layer._unfused_forward] and calls(model) == 0


def test_on_and_off_reach_the_settings_from_yaml_and_the_environment(tmp_path, monkeypatch):
    from kb.settings import load_settings

    path = tmp_path / "c.yaml"
    path.write_text("finetune: {fused_layers: off, compile: on}\n")  # YAML 1.1 reads these as booleans
    got = load_settings(str(path)).finetune
    assert (got.fused_layers, got.compile) == ("off", "on")
    monkeypatch.setenv("KB_FINETUNE__FUSED_LAYERS", "on")
    assert load_settings(None).finetune.fused_layers == "on"


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
    assert results["on"].kernels["fused_layer_calls"] >= 2 * 2 and results["off"].kernels["fused_layer_calls"] == 0
    assert results["on"].first_loss == pytest.approx(results["off"].first_loss, rel=1e-5)
    assert results["on"].train_loss == pytest.approx(results["off"].train_loss, rel=1e-4)


def test_compile_options_per_backend(monkeypatch):
    """graphs asks inductor for its CUDA-graph mode; another backend (tests' eager) takes no mode."""
    assert fl.compile_options(True) == {"mode": "reduce-overhead"}
    assert fl.compile_options(False) == {"backend": "inductor"}
    monkeypatch.setattr(fl, "COMPILE_BACKEND", "eager")
    assert fl.compile_options(True) == {"backend": "eager"}


@pytest.mark.parametrize(("setting", "mode"), [("graphs", "reduce-overhead"), ("on", None)])
def test_the_compile_setting_reaches_torch_compile(tmp_path, monkeypatch, setting, mode):
    """finetune.compile, from YAML through `train` to the torch.compile call of the layer function:
    graphs compiles in the CUDA-graph mode and marks each step's start for the graph trees."""
    from finetune.sft import Example, SFTTrainer, train
    from kb.settings import load_settings

    seen, steps = [], []
    monkeypatch.setattr(fl, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append((fn, kw)) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    path = tmp_path / "c.yaml"
    path.write_text(f"finetune: {{compile: {setting}, fused_layers: on, batch_size: 2, grad_accum: 1, "
                    "max_length: 32, logging_steps: 1, precision: fp32}\n")
    cfg = load_settings(str(path)).finetune
    assert cfg.compile == setting

    class Tok:
        pad_token_id, eos_token_id, eos_token, pad_token = 0, 1, "<pad>", "<pad>"

    g = torch.Generator().manual_seed(0)
    exs = [Example(ids, [-100] * 8 + ids[8:]) for ids in (torch.randint(3, 128, (16,), generator=g).tolist()
                                                          for _ in range(4))]
    model = _model("qwen2")
    made = []
    monkeypatch.setattr(SFTTrainer, "__init__", lambda self, *a, _init=SFTTrainer.__init__, **kw:
                        made.append(kw["cuda_graphs"]) or _init(self, *a, **kw))
    res = train(model, Tok(), exs, cfg, tmp_path / "out", method="lora", prec="fp32", max_steps=2, save=False,
                progress=False)
    assert res.kernels["compiled"] and res.kernels["fused_layers"] == 2
    assert res.kernels["cuda_graphs"] == (setting == "graphs") and made == [setting == "graphs"]
    assert [fn for fn, _ in seen] == [fl.layer_step]
    assert seen[0][1].get("mode") == mode and seen[0][1].get("backend", "inductor") == "inductor"
    assert all(layer._fused_graphs == (setting == "graphs") for layer in fl.decoder_layers(model))
    assert len(steps) == (2 if setting == "graphs" else 0)


@pytest.mark.parametrize(("setting", "on_cuda", "fixed_width", "want"),
                         [("auto", True, True, (True, True)), ("auto", True, False, (True, False)),
                          ("auto", False, True, (False, False)), ("on", True, True, (True, False)),
                          ("graphs", False, False, (True, True)), ("off", True, True, (False, False))])
def test_auto_replays_as_cuda_graphs_on_cuda_for_fixed_width_rows(setting, on_cuda, fixed_width, want):
    from finetune.sft import compile_choice
    from kb.settings import FinetuneConfig

    assert compile_choice(FinetuneConfig(compile=setting), "lora", on_cuda, fixed_width) == want


def test_keep_grads_stores_a_copy_of_each_incoming_gradient():
    """With gradient accumulation under CUDA graphs `.grad` must not be the graph's output tensor."""
    model = _model("qwen2")
    incoming = []
    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    lora.register_hook(lambda g: incoming.append(g))
    assert fl.keep_grads(model) == sum(p.requires_grad for p in model.parameters())
    ids = torch.randint(3, 128, (2, 8))
    model(input_ids=ids).logits.sum().backward()
    assert lora.grad is not None and lora.grad.data_ptr() != incoming[0].data_ptr()
    torch.testing.assert_close(lora.grad, incoming[0])
