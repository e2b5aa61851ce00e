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
    x = plain._inputs(MSGS)
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
