"""The local transformers backend on a tiny random-weight Qwen2 with the packaged tokenizer."""

from __future__ import annotations

import pytest

from serve.llm import LocalLLM, build_llm


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory, minilm_dir):
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_qwen")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


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
