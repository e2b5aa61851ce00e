import re
from pathlib import Path

import pytest

from kb.settings import ConfigError, load_settings


def test_defaults_come_from_the_yaml(monkeypatch):
    monkeypatch.delenv("KB_HOME", raising=False)
    s = load_settings()
    assert s.chunking.method == "nsp"
    assert s.models.embedder == "model:e5-small"
    assert s.answer.stream_mode == "checked"  # a withheld reply never reaches a client by default
    assert s.home == Path("kb_data")


def test_environment_beats_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("chunking:\n  threshold: 0.7\n  max_chars: 300\nhome: /data/a\n")
    monkeypatch.setenv("KB_CHUNKING__THRESHOLD", "0.25")
    monkeypatch.setenv("KB_HOME", str(tmp_path / "h"))
    s = load_settings(cfg)
    assert s.chunking.threshold == 0.25  # env
    assert s.chunking.max_chars == 300  # yaml, not clobbered by the nested env override
    assert s.home == tmp_path / "h"


def test_extends_merges_with_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("chunking:\n  method: nsp\n  max_chars: 321\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nchunking:\n  method: fixed\n")
    s = load_settings(tmp_path / "child.yaml")
    assert (s.chunking.method, s.chunking.max_chars) == ("fixed", 321)


@pytest.mark.parametrize("text, msg", [("chunking: [1, 2\n", "invalid YAML"),
                                       ("chunking:\n  method: magic\n", "chunking"),
                                       ("- a\n- b\n", "mapping")])
def test_bad_config_is_a_clear_error(tmp_path, text, msg):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_settings(cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, msg", [
    ("compliance:\n  sensitive_word: [secret]\n",
     "'compliance.sensitive_word' (did you mean compliance.sensitive_words?)"),
    ("modles:\n  llm: null\n", "'modles' (did you mean models?)"),
    ("llm:\n  generation:\n    max_new_token: 3\n", "did you mean llm.generation.max_new_tokens?"),
])
def test_an_unknown_key_in_yaml_is_an_error_naming_the_nearest_key(tmp_path, text, msg):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_settings(cfg)


def test_an_unknown_key_in_a_parent_or_an_override_is_an_error(tmp_path):
    (tmp_path / "base.yaml").write_text("retrieval:\n  hybird: false\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\n")
    with pytest.raises(ConfigError, match="did you mean retrieval.hybrid"):
        load_settings(tmp_path / "child.yaml")
    with pytest.raises(ConfigError, match="did you mean chunking.threshold"):
        load_settings(None, **{"chunking.treshold": 0.3})


@pytest.mark.parametrize("var, msg", [
    ("KB_COMPLIANCE__SENSITIVE_WORD",
     "KB_COMPLIANCE__SENSITIVE_WORD names no setting (did you mean KB_COMPLIANCE__SENSITIVE_WORDS?)"),
    ("KB_HOEM", "did you mean KB_HOME?"),
    ("KB_API_KEY", "did you mean KB_API_KEYS?"),
    ("KB_HOME__X", "home has no sub-keys"),
])
def test_an_unknown_kb_variable_is_an_error(monkeypatch, var, msg):
    monkeypatch.setenv(var, "x")
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_settings()


def test_a_typo_inside_a_json_section_variable_is_an_error(monkeypatch):
    monkeypatch.setenv("KB_COMPLIANCE", '{"sensitive_word": ["x"]}')
    with pytest.raises(ConfigError, match=re.escape("KB_COMPLIANCE: unknown setting 'compliance.sensitive_word' "
                                                    "(did you mean compliance.sensitive_words?)")):
        load_settings()
    monkeypatch.setenv("KB_COMPLIANCE", '{"sensitive_words": ["x"]}')
    assert load_settings().compliance.sensitive_words == ["x"]


def test_known_variables_and_every_shipped_config_load(monkeypatch):
    monkeypatch.setenv("KB_LLM__GENERATION__MAX_NEW_TOKENS", "7")
    monkeypatch.setenv("KB_NSP_TRAIN__MAX_PAIRS", "9")
    monkeypatch.setenv("KB_API_KEYS", "{}")
    monkeypatch.setenv("KB_SHARED_DATA", "/tmp")
    s = load_settings()
    assert (s.llm.generation.max_new_tokens, s.nsp_train.max_pairs) == (7, 9)
    root = Path(__file__).resolve().parent.parent / "configs"
    for cfg in root.glob("*.yaml"):
        if cfg.name != "approved_replies.yaml":
            load_settings(cfg)


def test_a_second_config_as_written_beats_the_environment_only_where_it_writes(tmp_path, monkeypatch):
    """`kb migrate --to FILE`: the keys FILE writes win over KB_* variables; keys it leaves to the
    file it extends, or does not set, keep the environment's and the base's values; `~` expands."""
    from kb.settings import load_settings_as_written

    base = tmp_path / "base.yaml"
    base.write_text("llm: {generation: {max_new_tokens: 333}}\nretrieval: {candidates: 77}\n")
    target = tmp_path / "target.yaml"
    target.write_text(f"extends: {base}\nhome: ~/kbx-target\nllm: {{generation: {{temperature: 0.9}}}}\n")
    monkeypatch.setenv("KB_HOME", str(tmp_path / "env-home"))
    monkeypatch.setenv("KB_LLM__GENERATION__TOP_P", "0.5")
    monkeypatch.setenv("KB_LLM__GENERATION__TEMPERATURE", "0.1")
    s = load_settings_as_written(target)
    assert s.home == Path("~/kbx-target").expanduser()
    g = s.llm.generation
    assert (g.temperature, g.top_p, g.max_new_tokens) == (0.9, 0.5, 333)
    assert s.retrieval.candidates == 77


def test_one_override_path_from_the_command_line_to_the_library(settings, tmp_path, monkeypatch, capsys):
    """`--set KEY=VALUE` and the flags that are its shorthand (`--epochs`, `--no-packing`, `--model`)
    land in the typed settings the library is called with, validated, above the file and the
    environment; a bad key or value is a usage error (exit 2) naming it."""
    import finetune.sft
    from cli.main import main as kb_main

    seen = {}

    def fake(s, data, out, **kw):
        seen["s"], seen["kw"] = s, kw
        return {"method": "lora", "steps": 0, "train_loss": 0.0, "tokens_per_s": 0.0, "peak_mem_gib": 0.0,
                "out": str(out), "loss_plot": ""}

    monkeypatch.setattr(finetune.sft, "finetune_llm", fake)
    monkeypatch.setenv("KB_FINETUNE__EPOCHS", "5")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("finetune: {learning_rate: 1.0e-3, grad_accum: 3}\n")
    assert kb_main(["finetune", "llm", "--config", str(cfg), "--data", "d.jsonl", "--out", str(tmp_path / "o"),
                    "--epochs", "2", "--no-packing", "--model", "some/base", "--max-steps", "7",
                    "--set", "finetune.learning_rate=2e-4", "--set", "finetune.lora.r=32"]) == 0
    f = seen["s"].finetune
    assert (f.epochs, f.packing, f.max_steps, f.learning_rate, f.lora.r, f.grad_accum) == (2.0, False, 7, 2e-4, 32, 3)
    assert seen["s"].models.llm == "some/base" and "method" not in seen["kw"]
    assert kb_main(["finetune", "llm", "--data", "d", "--out", "o", "--set", "finetune.nope=1"]) == 2
    assert "unknown setting 'finetune.nope'" in capsys.readouterr().err
    assert kb_main(["finetune", "llm", "--data", "d", "--out", "o", "--set", "finetune.epochs=many"]) == 2
    assert "finetune" in capsys.readouterr().err
    assert kb_main(["finetune", "llm", "--data", "d", "--out", "o", "--set", "noequals"]) == 2
