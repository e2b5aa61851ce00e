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
