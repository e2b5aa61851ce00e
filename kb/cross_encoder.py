"""Cross-encoders (both texts read together, `AutoModelForSequenceClassification`) as small
shippable weights: a peft LoRA adapter on the top encoder layers plus the classification head,
merged onto a base encoder into a plain folder that transformers and sentence-transformers load.

An asset folder holds `adapter_config.json`, `adapter_model.safetensors` (LoRA + head) and
`cross_encoder.json` (labels, max length, activation, what it was trained on). `build_cross_encoder`
merges it with the base; `load_merged` does the same in memory (a KB's adapted NSP model).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

from kb.fsutil import building_dir, make_readable

log = logging.getLogger(__name__)

ASSET_META = "cross_encoder.json"
SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"
_LAYER_LINEARS = (r"(attention\.self\.(query|key|value)|attention\.output\.dense|"
                  r"intermediate\.dense|output\.dense)")


class CrossEncoderError(ValueError):
    """A cross-encoder asset or base model is missing or does not fit."""


@contextmanager
def _quiet_transformers():
    """Silence "newly initialized: classifier.*" while a head is put on an encoder on purpose."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def read_meta(asset_dir: str | Path) -> dict:
    """The metadata of a cross-encoder asset folder; CrossEncoderError when it has none."""
    path = Path(asset_dir) / ASSET_META
    if not path.is_file():
        raise CrossEncoderError(f"{asset_dir} is not a cross-encoder asset: {ASSET_META} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def load_classifier(base_dir: str | Path, num_labels: int, id2label: dict | None = None):
    """`base_dir` as a sequence classifier: an encoder gets a fresh head of `num_labels`; a
    cross-encoder keeps its own head (its label count must match)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise CrossEncoderError(f"base model {base_dir} has no config.json")
    cfg = AutoConfig.from_pretrained(str(base_dir))
    is_classifier = is_sequence_classifier(cfg)
    if is_classifier and cfg.num_labels != num_labels:
        raise CrossEncoderError(f"{base_dir} has {cfg.num_labels} labels, the asset needs {num_labels}")
    labels = {int(k): v for k, v in (id2label or {}).items()}
    kwargs = {"num_labels": num_labels}
    if labels:
        kwargs.update(id2label=labels, label2id={v: k for k, v in labels.items()})
    with _quiet_transformers():
        return AutoModelForSequenceClassification.from_pretrained(str(base_dir), **kwargs)


def head_modules(model) -> list[str]:
    """The modules trained whole beside the LoRA layers: the head (and a BERT's pooler)."""
    names = ["classifier"]
    body = getattr(model, model.base_model_prefix, None)
    if getattr(body, "pooler", None) is not None:
        names.append("pooler")
    return names


def lora_targets(n_layers: int, top_layers: int) -> str:
    """A peft regex for the attention and feed-forward linears of the top `top_layers` layers."""
    layers = "|".join(str(i) for i in range(max(0, n_layers - top_layers), n_layers))
    return rf".*encoder\.layer\.({layers})\.{_LAYER_LINEARS}"


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, top_layers: int = 4):
    """Wrap `model` in a LoRA adapter on its top layers; the head trains whole."""
    from peft import LoraConfig, get_peft_model

    n = model.config.num_hidden_layers
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="SEQ_CLS",
                     target_modules=lora_targets(n, min(top_layers, n)), modules_to_save=head_modules(model))
    return get_peft_model(model, cfg)


def is_sequence_classifier(cfg) -> bool:
    """Whether a transformers config describes a `...ForSequenceClassification` model."""
    return any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))


def save_asset(peft_model, asset_dir: str | Path, meta: dict, extra: dict[str, dict] | None = None) -> Path:
    """Save the adapter (LoRA + head) and `meta` (needs num_labels, max_length, activation_fn)
    to `asset_dir`, with `extra` JSON files (name -> content) beside them, atomically."""
    missing = {"num_labels", "max_length", "activation_fn"} - set(meta)
    if missing:
        raise CrossEncoderError(f"cross-encoder meta lacks {sorted(missing)}")
    asset_dir = Path(asset_dir)
    with building_dir(asset_dir) as tmp:
        peft_model.save_pretrained(str(tmp))
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = meta.get("base", cfg.get("base_model_name_or_path"))
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
        for name, data in {ASSET_META: meta, **(extra or {})}.items():
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        make_readable(tmp)
    return asset_dir


def load_merged(base_dir: str | Path, asset_dir: str | Path):
    """(model, tokenizer, meta): the base with the asset's adapter merged in, in memory."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    meta = read_meta(asset_dir)
    if not (Path(asset_dir) / "adapter_config.json").is_file():
        raise CrossEncoderError(f"{asset_dir}: adapter_config.json is missing")
    model = load_classifier(base_dir, int(meta["num_labels"]), meta.get("id2label"))
    model = PeftModel.from_pretrained(model, str(asset_dir)).merge_and_unload()
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.model_max_length = int(meta["max_length"])
    set_activation(model, meta["activation_fn"])
    return model, tok, meta


def set_activation(model, activation_fn: str) -> None:
    """Record the score activation where sentence-transformers' CrossEncoder reads it."""
    st = dict(getattr(model.config, "sentence_transformers", None) or {})
    st["activation_fn"] = activation_fn
    model.config.sentence_transformers = st


def build_cross_encoder(base_dir: Path, asset_dir: Path, out_dir: Path) -> None:
    """Merge the base encoder and the shipped weights into `out_dir`, a folder that
    `AutoModelForSequenceClassification` and `sentence_transformers.CrossEncoder` load; written
    to a temporary folder and renamed into place."""
    model, tok, meta = load_merged(base_dir, asset_dir)
    with building_dir(Path(out_dir)) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / ASSET_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        make_readable(tmp)
    log.info("cross-encoder %s + %s -> %s", base_dir, asset_dir, out_dir)


def label_index(config, names: tuple[str, ...]) -> int | None:
    """The index of the first label of `config.id2label` whose name is in `names` (any case)."""
    wanted = {n.lower() for n in names}
    for i, name in sorted((int(k), str(v)) for k, v in (config.id2label or {}).items()):
        if re.sub(r"[\s-]+", "_", name.lower()) in wanted:
            return i
    return None
