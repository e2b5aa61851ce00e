"""The local transformers backend on a tiny random-weight Llama with the packaged tokenizer."""

from __future__ import annotations

import pytest

from serve.llm import LocalLLM, build_llm

MSGS = [{"role": "system", "content": "Answer from the context."},
        {"role": "user", "content": "Context: refunds take five days. Question: how long do refunds take?"}]


def _settings(settings, path, **over):
    settings.models.llm = str(path)
    settings.llm.generation.temperature = 0.0
    settings.llm.generation.max_new_tokens = 12
    for k, v in over.items():
        setattr(settings.llm, k, v)
    return settings


def test_local_llm_generates_and_streams_the_same_greedy_text(settings, tiny_llm_dir):
    llm = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir))
    text = llm.generate(MSGS)
    assert text and len(llm.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 12
    assert "".join(llm.stream(MSGS)).strip() == text
    assert llm.generate(MSGS) == text  # greedy is deterministic


def test_lora_adapter_is_applied_at_load(settings, tiny_llm_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    plain = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir))
    adapted = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir, adapter=str(tmp_path / "adapter")))
    x = plain.inputs(MSGS)
    with torch.no_grad():
        a, b = plain.model(**x).logits, adapted.model(**x).logits
    assert not torch.allclose(a, b, atol=1e-4)


def test_build_llm_picks_the_backend(settings, tiny_llm_dir):
    assert build_llm(settings) is None  # nothing configured: extractive
    settings.llm.backend = "openai"
    with pytest.raises(ValueError, match="openai_base_url"):
        build_llm(settings)
    settings.llm.backend = "auto"
    assert isinstance(build_llm(_settings(settings, tiny_llm_dir)), LocalLLM)


def test_missing_local_model_names_itself(settings):
    from kb.models import ModelNotFoundError

    settings.models.llm = "/nonexistent/model-dir"
    settings.llm.backend = "local"
    with pytest.raises(ModelNotFoundError, match="model-dir"):
        build_llm(settings)


def test_prefix_cache_logits_equal_a_plain_forward_pass(settings, tiny_llm_dir):
    import torch

    llm = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir, dtype="fp32"))  # exact comparison
    ids = llm.inputs(MSGS)["input_ids"]
    cache = llm._cached_prefix(MSGS, ids)
    n = cache.get_seq_length()
    assert 0 < n < ids.shape[1]
    with torch.no_grad():
        cached = llm.model(input_ids=ids[:, n:], past_key_values=cache).logits
        plain = llm.model(input_ids=ids).logits[:, n:]
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-4)
    stored = next(iter(llm._prefixes.values()))[1]
    assert stored.get_seq_length() == n  # each request works on a copy
    other = [{"role": "system", "content": "Something else entirely."}, MSGS[1]]
    assert llm._cached_prefix(other, ids) is None  # not a prefix of these tokens: no cache
    assert llm._cached_prefix(MSGS[1:], ids) is None  # no system message


def test_prefix_cache_does_not_change_greedy_output(settings, tiny_llm_dir):
    with_cache = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir))
    without = LocalLLM(str(tiny_llm_dir), _settings(settings.model_copy(deep=True), tiny_llm_dir, prefix_cache=False))
    assert with_cache.prefix_cache and not without.prefix_cache
    assert with_cache.generate(MSGS) == without.generate(MSGS) == with_cache.generate(MSGS)
    assert len(with_cache._prefixes) == 1 and not without._prefixes
    seen, forward = [], with_cache.model.forward

    def spy(*a, **kw):
        seen.append(kw["input_ids"].shape[1])
        return forward(*a, **kw)

    with_cache.model.forward = spy
    with_cache.generate(MSGS)
    n_prompt = with_cache.inputs(MSGS)["input_ids"].shape[1]
    n_prefix = next(iter(with_cache._prefixes.values()))[0].shape[0]
    assert seen[0] == n_prompt - n_prefix  # the prefill skipped the cached system prompt


@pytest.mark.parametrize("dtype, want", [("bf16", "bfloat16"), ("fp32", "float32"), ("fp16", "float16")])
def test_llm_dtype_setting_arrives(settings, tiny_llm_dir, dtype, want):
    llm = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir, dtype=dtype))
    assert str(next(llm.model.parameters()).dtype) == f"torch.{want}"


def test_auto_dtype_follows_the_cpu(monkeypatch):
    import torch

    from serve import llm as llm_mod

    monkeypatch.setattr(llm_mod, "cpu_has_bf16", lambda: True)
    assert llm_mod.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(llm_mod, "cpu_has_bf16", lambda: False)
    assert llm_mod.resolve_dtype("auto", "cpu") == torch.float32
    assert llm_mod.resolve_dtype("fp16", "cpu") == torch.float16


def test_default_llm_not_installed_means_extractive_with_one_warning(settings, caplog):
    from kb.models import ModelNotFoundError
    from serve import llm as llm_mod

    settings.models.llm = "model:no-such-llm"
    with caplog.at_level("WARNING", logger="serve.llm"):
        assert build_llm(settings) is None and build_llm(settings) is None
    assert sum("model:no-such-llm is not installed" in r.getMessage() for r in caplog.records) == 1
    assert llm_mod.pick_backend(settings) == "extractive"
    settings.llm.openai_base_url = "http://127.0.0.1:9/v1"
    assert llm_mod.pick_backend(settings) == "openai"  # an endpoint that is set wins over the default model
    settings.llm.openai_base_url = None
    settings.llm.backend = "local"  # asked for explicitly: a clear error
    with pytest.raises(ModelNotFoundError, match="no-such-llm"):
        build_llm(settings)


def test_adapter_not_installed_is_skipped_but_a_missing_folder_is_an_error(settings, tiny_llm_dir, caplog):
    from kb.models import ModelNotFoundError

    with caplog.at_level("WARNING", logger="serve.llm"):
        llm = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir, adapter="model:no-such-adapter"))
    plain = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir, adapter=None))
    assert llm.adapter is None and llm.generate(MSGS) == plain.generate(MSGS)  # the base model, unchanged
    assert any("no-such-adapter" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelNotFoundError, match="missing-adapter"):
        LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir, adapter="/nonexistent/missing-adapter"))


def test_closing_a_stream_stops_generation_and_errors_reach_the_consumer(settings, tiny_llm_dir, monkeypatch):
    s = _settings(settings, tiny_llm_dir)
    s.llm.generation.max_new_tokens = 200
    llm = LocalLLM(str(tiny_llm_dir), s)
    gen = llm.stream(MSGS)
    first = next(gen)
    assert isinstance(first, str)
    gen.close()  # joins the generation thread: it stopped
    assert llm._lock.acquire(blocking=False)
    llm._lock.release()

    def boom(**kw):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(llm.model, "generate", boom)
    with pytest.raises(RuntimeError, match="generation failed"):
        list(llm.stream(MSGS))


def test_int8_and_threads_settings_arrive(settings, tiny_llm_dir):
    import torch

    before = torch.get_num_threads()
    try:
        llm = LocalLLM(str(tiny_llm_dir), _settings(settings, tiny_llm_dir, quantize="int8", threads=1, dtype="bf16"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    mods = dict(llm.model.named_modules())
    assert isinstance(mods["model.layers.0.self_attn.q_proj"], QLinear) and isinstance(mods["lm_head"], QLinear)
    down = mods["model.layers.0.mlp.down_proj"]  # kept out of int8: bf16 where the CPU has it, else fp32
    assert not isinstance(down, QLinear) and down.linear.weight.dtype == torch.bfloat16
    assert llm.name.endswith("+int8")
    assert isinstance(llm.generate(MSGS), str)
