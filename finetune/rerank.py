"""Reranker training (`kb finetune rerank`): a cross-encoder with one relevance logit, a LoRA
adapter on the top encoder layers and a head (kb/cross_encoder.py), trained listwise: each query
against its positive passage and its hard negatives (cross-entropy over the group, positive
first). Scores are sigmoid(logit) at run time; only their order matters to the reranker.

Starts from a plain encoder (a new reranker: `scripts/train_rerank_e5.py` made the shipped
`rerank-e5` on e5-small) or from an existing reranker (adapting it to a KB from the
`{"query", "pos", "neg"}` rows of `kb finetune data`).
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kb.cross_encoder import SIGMOID, add_lora, build_cross_encoder, load_classifier, save_asset
from kb.cross_train import FitConfig, fit, predict
from kb.jsonl import read_jsonl
from kb.models import pick_device

log = logging.getLogger(__name__)

Group = tuple[str, list[str]]
"""(query, [positive, negative, ...])"""


def groups_from_rows(rows: Sequence[dict], negatives: int) -> tuple[list[Group], int]:
    """Training groups from `{"query", "pos", "neg"}` rows: each positive with the row's first
    `negatives` hard negatives; rows with fewer are skipped (returned as a count)."""
    out, skipped = [], 0
    for r in rows:
        pos = r.get("pos") or []
        pos = [pos] if isinstance(pos, str) else pos
        neg = r.get("neg") or []
        neg = [neg] if isinstance(neg, str) else neg
        if not str(r.get("query", "")).strip() or not pos or len(neg) < negatives:
            skipped += 1
            continue
        out += [(str(r["query"]), [str(p), *map(str, neg[:negatives])]) for p in pos]
    return out, skipped


def read_groups(path: str | Path, negatives: int) -> tuple[list[Group], int]:
    """Reranker training groups from a JSONL file and the count of rows skipped (`groups_from_rows`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such training file: {path}")
    rows, problems = read_jsonl(path)
    for p in problems:
        log.warning("%s", p)
    return groups_from_rows([r for _, r in rows], negatives)


def group_accuracy(model, tok, groups: Sequence[Group], max_length: int, device: str) -> dict:
    """Share of groups whose positive outscores all negatives, and the positive's mean reciprocal rank."""
    if not groups:
        return {"top1": None, "mrr": None}
    pairs = [(q, p) for q, ps in groups for p in ps]
    scores = predict(model, tok, pairs, max_length, kind="listwise", device=device)[:, -1]
    g = len(groups[0][1])
    s = scores.reshape(len(groups), g)
    ranks = (s > s[:, :1]).sum(1) + 1
    return {"top1": round(float((ranks == 1).mean()), 4), "mrr": round(float((1 / ranks).mean()), 4)}


def train_reranker(groups: list[Group], base_dir: str | Path, out_dir: str | Path, *, base_spec: str,
                   fit_cfg: FitConfig | None = None, lora_r: int = 16, top_layers: int = 4,
                   heldout: float = 0.1, merge: bool = True, device: str = "auto", progress: bool = True,
                   trained_on: str = "", seed: int = 13) -> dict:
    """Train on `groups` (a `heldout` share kept aside for top-1 accuracy) and write `out_dir`:
    a full CrossEncoder folder (`merge`) or only the small asset (adapter + head)."""
    from transformers import AutoTokenizer

    if len(groups) < 4:
        raise ValueError(f"too few training groups ({len(groups)}): need query, positive and negatives")
    if len({len(ps) for _, ps in groups}) != 1:
        raise ValueError("every group needs the same number of negatives")
    cfg = fit_cfg or FitConfig(max_length=256, batch_size=4)
    dev = pick_device(device)
    groups = list(groups)
    random.Random(seed).shuffle(groups)
    n_held = int(len(groups) * heldout)
    test, train = groups[:n_held], groups[n_held:]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = add_lora(load_classifier(base_dir, 1), r=lora_r, alpha=2 * lora_r, top_layers=top_layers)
    before = group_accuracy(model, tok, test, cfg.max_length, dev)
    stats = fit(model, tok, train, "listwise", cfg, dev, progress)
    after = group_accuracy(model, tok, test, cfg.max_length, dev)
    meta = {"task": "rerank", "num_labels": 1, "max_length": cfg.max_length, "activation_fn": SIGMOID,
            "base": base_spec, "groups": len(groups), "train_groups": len(train), "heldout_groups": len(test),
            "negatives_per_group": len(groups[0][1]) - 1, "heldout_before": before, "heldout_after": after,
            "lora_r": lora_r, "top_layers": top_layers, "device": dev, "trained_on": trained_on, **stats}
    out = Path(out_dir)
    if merge:
        with tempfile.TemporaryDirectory() as tmp:
            save_asset(model, Path(tmp) / "asset", meta)
            build_cross_encoder(Path(base_dir), Path(tmp) / "asset", out)
    else:
        save_asset(model, out, meta)
    log.info("reranker: held-out top-1 %s -> %s on %d groups -> %s", before["top1"], after["top1"], len(test), out)
    return {**meta, "out": str(out)}


def finetune_reranker(settings, data: str | Path, out: str | Path, *, model: str | None = None,
                      progress: bool = True, max_steps: int | None = None) -> dict:
    """`kb finetune rerank`: adapt `model` (default models.reranker, else a new head on
    models.embedder) to `data`'s query/pos/neg rows; writes a full CrossEncoder folder."""
    from kb.models import resolve_model

    c = settings.finetune
    spec = model or settings.models.reranker or settings.models.embedder
    groups, skipped = read_groups(data, c.rerank_negatives)
    if skipped:
        log.warning("%d rows skipped: fewer than finetune.rerank_negatives=%d hard negatives", skipped,
                    c.rerank_negatives)
    cfg = FitConfig(epochs=c.rerank_epochs, batch_size=c.rerank_batch_size, lr=c.rerank_learning_rate,
                    max_length=c.rerank_max_length, seed=c.seed, max_steps=max_steps)
    meta = train_reranker(groups, resolve_model(spec, "reranker"), out, base_spec=spec, fit_cfg=cfg,
                          lora_r=c.rerank_lora_r, top_layers=c.rerank_top_layers, device=settings.models.device,
                          progress=progress, trained_on=str(data), seed=c.seed)
    return {**meta, "skipped_rows": skipped}
