"""Train a cross-encoder's LoRA adapter and head (see kb/cross_encoder.py) on text pairs.

Two objectives, one loop:
- `classify`: examples (a, b, label), cross-entropy over the model's labels (next-sentence);
- `listwise`: examples (query, [positive, negative, ...]), one logit per pair, cross-entropy over
  each group with the positive first (reranking: the positive must outscore its negatives).

Batches are length-bucketed (little padding), bf16 autocast on CPUs and GPUs that compute it,
and a CPU budget (`max_seconds`) ends training early with the learning rate decayed by then.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class FitConfig:
    epochs: float = 1.0
    batch_size: int = 16
    """Pairs per step (listwise: groups per step)."""
    lr: float = 3e-4
    head_lr: float = 1e-3
    max_length: int = 128
    warmup: float = 0.1
    seed: int = 13
    max_steps: int | None = None
    max_seconds: float | None = None
    """Stop after this many seconds of training; the learning rate decays to 0 by then (or by
    the last step, whichever comes first)."""
    max_cpu_seconds: float | None = None
    """The same in this process's CPU time (all threads): a budget that means the same on an idle
    machine and on one whose cores are shared."""
    precision: str = "auto"
    """auto: bf16 autocast where the device computes bf16 natively, else fp32; or bf16 / fp32."""


def _use_bf16(precision: str, device: str) -> bool:
    if precision != "auto":
        return precision == "bf16"
    import torch

    from kb.models import cpu_has_bf16

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def _buckets(items: list, lengths: list[int], size: int, rng: random.Random) -> list[list]:
    """Shuffled batches of similar length: sort within windows of 50 batches, then shuffle batches."""
    order = list(range(len(items)))
    rng.shuffle(order)
    out = []
    window = size * 50
    for s in range(0, len(order), window):
        part = sorted(order[s : s + window], key=lambda i: lengths[i])
        out += [[items[i] for i in part[b : b + size]] for b in range(0, len(part), size)]
    rng.shuffle(out)
    return out


def encode(tok, a: Sequence[str], b: Sequence[str], max_length: int, device: str, kind: str):
    """Tokenized pairs: both sides cut evenly (classify) or only the passage (listwise)."""
    trunc = "only_second" if kind == "listwise" else "longest_first"
    return tok(list(a), list(b), truncation=trunc, max_length=max_length, padding=True,
               return_tensors="pt").to(device)


def fit(model, tok, examples: Sequence, kind: str, cfg: FitConfig, device: str = "cpu",
        progress: bool = True) -> dict:
    """Train `model` (a peft model) in place on `examples`; returns steps, loss and timing."""
    import torch
    from tqdm.auto import tqdm

    if kind not in ("classify", "listwise"):
        raise ValueError(f"unknown objective {kind!r}: classify or listwise")
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model.to(device).train()
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    body = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.01)
    trained = [p for g in groups for p in g["params"]]
    lengths = [len(x[0]) + (len(x[1]) if kind == "classify" else sum(map(len, x[1]))) for x in examples]
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    steps = max(1, int(per_epoch * cfg.epochs))
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    warm = max(1, int(steps * cfg.warmup))
    t0, c0 = time.perf_counter(), time.process_time()

    def done(s: int) -> float:  # share of the run behind us: by steps, wall time or CPU time
        wall = (time.perf_counter() - t0) / cfg.max_seconds if cfg.max_seconds else 0.0
        cpu = (time.process_time() - c0) / cfg.max_cpu_seconds if cfg.max_cpu_seconds else 0.0
        return max(s / steps, wall, cpu)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - done(s)))
    bf16 = _use_bf16(cfg.precision, device)
    losses: list[float] = []
    seen = 0
    bar = tqdm(total=steps, desc=f"train cross-encoder ({kind})", disable=not progress, unit="step")
    stopped = "steps"
    step = 0
    while step < steps:
        for batch in _buckets(list(examples), lengths, cfg.batch_size, rng):
            if step >= steps:
                break
            loss = _loss(model, tok, batch, kind, cfg.max_length, device, bf16)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            seen += len(batch)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if done(step) >= 1.0 and step < steps:
                stopped = "time budget"
                steps = step
                break
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    return {"steps": step, "examples_seen": seen, "stopped_by": stopped, "bf16": bf16,
            "cpu_seconds": round(time.process_time() - c0, 1),
            "first_loss": round(float(np.mean(losses[:20])), 4), "final_loss": round(float(np.mean(losses[-20:])), 4),
            "seconds": round(seconds, 1), "examples_per_s": round(seen / seconds, 2), "config": asdict(cfg)}


def _loss(model, tok, batch: list, kind: str, max_length: int, device: str, bf16: bool):
    import torch

    if kind == "classify":
        enc = encode(tok, [x[0] for x in batch], [x[1] for x in batch], max_length, device, kind)
        labels = torch.tensor([int(x[2]) for x in batch], device=device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = model(**enc).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels)
    sizes = {len(x[1]) for x in batch}
    if len(sizes) != 1:
        raise ValueError("listwise groups in a batch must have the same number of passages")
    g = sizes.pop()
    enc = encode(tok, [x[0] for x in batch for _ in range(g)], [p for x in batch for p in x[1]],
                 max_length, device, kind)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        logits = model(**enc).logits
    scores = logits.float()[:, -1].view(len(batch), g)
    return torch.nn.functional.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.long, device=device))


def predict(model, tok, pairs: Sequence[tuple[str, str]], max_length: int, kind: str = "classify",
            batch_size: int = 32, device: str = "cpu"):
    """Logits of `pairs` (n, num_labels), in input order, no gradients."""
    import torch

    out = []
    order = np.argsort([len(a) + len(b) for a, b in pairs], kind="stable")
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = encode(tok, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], max_length, device, kind)
            out.append(model(**enc).logits.float().cpu().numpy())
    logits = np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)
    res = np.empty_like(logits)
    res[order] = logits
    return res
