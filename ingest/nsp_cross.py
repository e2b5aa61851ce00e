"""Train a next-sentence cross-encoder: a LoRA adapter on the top encoder layers and a 2-label
head (kb/cross_encoder.py), on a plain encoder (a new model, e.g. the shipped `nsp-e5` on
e5-small) or on an existing cross-encoder (adapting it to a knowledge base: `kb train-nsp`
with `nsp_train.kind: cross`).

The output folder is a cross-encoder asset (a few MB) plus `nsp_meta.json`; `CrossNSPScorer`
loads it by merging it onto its base, and `kb.cross_encoder.build_cross_encoder` turns it into
a plain folder. Labels follow BERT's next-sentence convention: 0 = continues, 1 = not next.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ingest.nsp import META_FILE, NSPPair
from kb.cross_encoder import IDENTITY, add_lora, load_classifier, save_asset
from kb.cross_train import FitConfig, fit, predict
from kb.models import pick_device

log = logging.getLogger(__name__)

NSP_LABELS = {0: "continues", 1: "not_next"}


def train_cross_nsp(pairs: list[NSPPair], base_dir: str | Path, out_dir: str | Path, *, base_spec: str,
                    fit_cfg: FitConfig | None = None, lora_r: int = 16, top_layers: int = 4,
                    heldout: float = 0.15, device: str = "auto", progress: bool = True,
                    adapted_from: str | None = None, trained_on: str = "") -> dict:
    """Train on `pairs` (the first `heldout` share is held out for accuracy), save to `out_dir`.

    `base_spec` is how the asset names its base (`model:e5-small`, a folder): the loader
    resolves it. Returns the metadata written to `nsp_meta.json`.
    """
    from transformers import AutoTokenizer

    if len(pairs) < 4:
        raise ValueError(f"too little text to train a next-sentence model ({len(pairs)} pairs)")
    cfg = fit_cfg or FitConfig()
    dev = pick_device(device)
    n_held = max(2, int(len(pairs) * heldout))
    test, train = pairs[:n_held], pairs[n_held:]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = add_lora(load_classifier(base_dir, 2, NSP_LABELS), r=lora_r, alpha=2 * lora_r, top_layers=top_layers)
    stats = fit(model, tok, [(p.a, p.b, p.label) for p in train], "classify", cfg, dev, progress)
    t0 = time.perf_counter()
    logits = predict(model, tok, [(p.a, p.b) for p in test], cfg.max_length, device=dev)
    acc = float((logits.argmax(1) == np.array([p.label for p in test])).mean())
    meta = {"kind": "cross", "out": str(out_dir), "base": base_spec, "adapted_from": adapted_from,
            "pairs": len(pairs), "train_pairs": len(train), "heldout_pairs": len(test),
            "heldout_accuracy": round(acc, 4), "heldout_seconds": round(time.perf_counter() - t0, 1),
            "lora_r": lora_r, "top_layers": top_layers, "device": dev, "trained_on": trained_on, **stats}
    asset = {"task": "next_sentence", "num_labels": 2, "id2label": NSP_LABELS, "max_length": cfg.max_length,
             "activation_fn": IDENTITY, **{k: v for k, v in meta.items() if k != "out"}}
    out = save_asset(model, out_dir, asset, extra={META_FILE: meta})
    log.info("NSP cross-encoder: held-out accuracy %.3f on %d pairs -> %s", acc, len(test), out)
    return meta
