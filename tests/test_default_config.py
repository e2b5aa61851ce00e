"""configs/default.yaml is generated from the typed settings (`kb config defaults`) and stays so."""

import os

import pytest
import yaml
from pydantic import BaseModel

from kb.defaults import default_yaml, first_sentence
from kb.settings import DEFAULT_CONFIG, REPO_ROOT, Settings, _section_type, load_settings

REGENERATE = "kb config defaults --out configs/default.yaml"


@pytest.fixture
def no_kb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KB_"):
            monkeypatch.delenv(name)


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None, bool]]:
    """(dotted key, description, is a section) for every field of `model` and of its sections."""
    out = []
    for name, field in model.model_fields.items():
        sub = _section_type(field.annotation)
        out.append((prefix + name, field.description, sub is not None))
        if sub is not None:
            out += _fields(sub, f"{prefix}{name}.")
    return out


def test_the_committed_default_yaml_is_the_generated_one():
    committed = DEFAULT_CONFIG.read_bytes()
    assert committed == default_yaml().encode("utf-8"), (
        "configs/default.yaml differs from the typed settings' defaults (kb/settings.py); "
        f"regenerate it with `{REGENERATE}`")


def test_the_default_yaml_loads_back_to_the_defaults(no_kb_env):
    assert load_settings(DEFAULT_CONFIG) == Settings()
    assert load_settings() == Settings()


def test_the_default_yaml_states_every_key(no_kb_env):
    data = yaml.safe_load(default_yaml())
    for key, _, _ in _fields(Settings):
        node = data
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is missing from default_yaml()"
            node = node[part]


def test_the_environment_does_not_leak_into_the_defaults(monkeypatch):
    before = default_yaml()
    monkeypatch.setenv("KB_HOME", "/somewhere/else")
    monkeypatch.setenv("KB_CHUNKING__THRESHOLD", "0.123")
    assert default_yaml() == before
    assert "0.123" not in before and "/somewhere/else" not in before


def test_every_setting_is_documented():
    fields = _fields(Settings)
    assert len(fields) > 150
    undocumented = [key for key, doc, _ in fields if not (doc and doc.strip())]
    assert not undocumented, f"settings without a docstring in kb/settings.py: {undocumented}"


def test_every_key_has_a_comment_in_the_yaml():
    lines = default_yaml().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and i > 0:
            documented = "  # " in line or lines[i - 1].lstrip().startswith("#")
            assert documented, f"no comment for line {i + 1}: {line!r}"


def _shipped_settings_files() -> list:
    replies = REPO_ROOT / Settings.model_fields["compliance"].get_default(call_default_factory=True).approved_replies
    return [p for p in sorted((REPO_ROOT / "configs").glob("*.yaml")) if p != DEFAULT_CONFIG and p != replies]


@pytest.mark.parametrize("path", _shipped_settings_files(), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, no_kb_env):
    settings = load_settings(path)
    assert settings != Settings()  # a variant states something that differs


def test_first_sentence_keeps_abbreviations():
    assert first_sentence("A model (e.g. `x`). Then more.") == "A model (e.g. `x`)."
    assert first_sentence("One\n    line. Two.") == "One line."


def test_kb_config_defaults_prints_the_generated_file(capsys, tmp_path):
    """The CLI command the failure message names prints (or writes) exactly the generated YAML,
    without loading the configuration it may be regenerating."""
    from cli import main
    from kb.defaults import default_yaml

    assert main(["config", "defaults"]) == 0
    assert capsys.readouterr().out == default_yaml()
    out = tmp_path / "d.yaml"
    assert main(["config", "defaults", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == default_yaml()
