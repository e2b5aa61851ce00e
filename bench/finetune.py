"""LLM fine-tuning throughput: the project's trainer against the Hugging Face stack, in the same
run, on the same examples and the same initial weights, each side in its own process (Liger
patches model classes globally; compile caches and memory statistics stay apart).

Sides:
- `project`: `finetune.sft.train` (packing to width, fused LM head + loss over reply tokens,
  fused kernels where `finetune.kernels` allows, compiled decoder layers);
- `baseline`: transformers Trainer + peft, defaults: each batch padded to its longest example,
  loss from full logits;
- `recipe`: the strongest plain Hugging Face recipe: Trainer + peft + Liger kernels (RoPE,
  RMSNorm, SwiGLU, fused linear cross-entropy) + padding-free batches
  (`DataCollatorWithFlattening`, the whole batch one row with restarting positions);
- `recipe_packed`: the same Liger model and Trainer fed the project's packed rows (examples packed
  to width, positions restarting per example): on SFT-shaped data the fair "best HF", and on
  every-example-1,024 rows exactly Liger on unpadded batches.

Random weights of real shapes (speed does not depend on the weights). Examples are SFT-shaped
(`--lengths sft`: prompts 64-900 tokens, replies 16-256) or every example exactly `--max-length`
tokens (`--lengths full`). Every side counts real tokens only; MFU counts the model's FLOPs
(forward, activation gradients, no weight gradients of frozen weights; causal attention over each
example's own length); HFU counts the FLOPs each side actually does, adding the forward that its
activation checkpointing runs again (transformers': every decoder layer whole; the fused layers':
all but the down projection).

    python -m bench.finetune --shapes 0.5b,7b --name finetune_gpu      # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import table, write_result
from bench.generate import SHAPES

ROOT = Path(__file__).resolve().parent.parent

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
SIDES = ("project", "baseline", "recipe", "recipe_packed")
BUSY_STEPS = 2
"""Steps that --gpu-busy records, after the timed ones (recording slows them)."""


def examples(n: int, vocab: int, kind: str, max_length: int, seed: int = 0):
    from finetune.sft import IGNORE, Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if kind == "full":
            p, r = max_length * 3 // 4, max_length - max_length * 3 // 4
        else:
            p, r = rng.randint(64, 900), rng.randint(16, 256)
            p = min(p, max_length - r)
        ids = [rng.randrange(10, vocab) for _ in range(p + r)]
        out.append(Example(ids, [IGNORE] * p + ids[p:]))
    return out


LOGIT_STD = 3.0
"""Spread of the random model's logits: at the default initialisation every token's loss is about
ln(vocab) whatever the mask, so agreeing first losses would prove nothing; with logits this spread
the loss depends on which positions are labelled and on the targets."""


def build(shape: str, targets: list[str] | str, r: int, seed: int = 0, device: str = "cuda", **config):
    """A Qwen2 model of `shape` (random weights, bf16 on `device`) with LoRA adapters; the LM head
    scaled so the logits have a standard deviation of about LOGIT_STD."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**SHAPES.get(shape, {}), **config}, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_STD / (cfg.initializer_range * cfg.hidden_size ** 0.5))
    torch.manual_seed(seed + 1)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=targets))


def linear_params(model) -> dict:
    """Weights of the linear layers (all, inside decoder layers, down projections; LoRA's not
    counted), layers and hidden size."""
    import torch

    base = model.get_base_model()
    linears = [(name, m.weight.numel()) for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name]
    return {"all": sum(n for _, n in linears), "in_layers": sum(n for name, n in linears if ".layers." in name),
            "head": base.get_output_embeddings().weight.numel(),
            "down": sum(n for name, n in linears if name.endswith(("down_proj", "down_proj.base_layer"))),
            "layers": base.config.num_hidden_layers, "d_model": base.config.hidden_size}


def flops_per_token(p: dict, attn_len: float, head_share: float = 1.0, recomputed_weights: int = 0,
                    recompute_attention: bool = False) -> float:
    """FLOPs per trained token, LoRA (frozen base): forward 2 per weight and 2*len*d per layer for
    causal attention (QK^T and PV over half the square; `attn_len` = sum(len^2) / sum(len) over the
    examples); backward twice that for activations (no weight gradients of frozen weights; LoRA's
    own are under 1%). The LM head runs on `head_share` of the positions (the model needs it only
    where a label is). Plus what checkpointing runs again: 2 per `recomputed_weights` and the
    attention forward."""
    attn = 2 * p["layers"] * attn_len * p["d_model"]
    body = p["all"] - p["head"]
    return (4 * body + 4 * p["head"] * head_share + 3 * attn + 2 * recomputed_weights
            + (attn if recompute_attention else 0))


def shares(exs) -> tuple[float, float]:
    """(sum(len^2) / sum(len), share of positions whose next token is labelled) over examples."""
    from finetune.sft import IGNORE

    tokens = sum(len(e) for e in exs)
    labelled = sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in exs)
    return sum(len(e) ** 2 for e in exs) / tokens, labelled / tokens


def recomputed(side: str, p: dict, checkpointing: bool, kernels: dict | None) -> int:
    """Weights whose forward checkpointing runs again: every decoder-layer weight for transformers'
    checkpointing; the fused layers skip the down projection, whose output no gradient reads."""
    if not checkpointing:
        return 0
    fused = side == "project" and (kernels or {}).get("fused_layers")
    return p["in_layers"] - (p["down"] if fused else 0)


class Tok:
    """What the trainers need of a tokenizer: pad and eos ids."""

    pad_token_id = 0
    eos_token_id = 1
    eos_token = pad_token = "<pad>"


def profiled_steps(start: int, n: int, cpu: bool, done: Callable):
    """A TrainerCallback that runs torch's profiler over steps [start, start + n) (the GPU's
    activity, and the CPU's with `cpu`), synchronizing the GPU at both ends, then calls
    `done(profiler, wall seconds of the window)`."""
    import torch
    from transformers import TrainerCallback

    class _P(TrainerCallback):
        prof = None
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start:
                torch.cuda.synchronize()
                kinds = torch.profiler.ProfilerActivity
                self.prof = torch.profiler.profile(activities=[kinds.CUDA, kinds.CPU] if cpu else [kinds.CUDA])
                self.prof.__enter__()
                torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == start + n:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                prof, self.prof = self.prof, None
                done(prof, wall)

    return _P()


def kernel_table(path: str, start: int, n: int = 3):
    """`profiled_steps` (CPU and GPU) writing the top kernels by CUDA time into `path`."""
    def done(prof, _wall: float) -> None:
        Path(path).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45,
                                                        max_name_column_width=70))
    return profiled_steps(start, n, True, done)


def gpu_busy(into: dict, start: int, n: int = 2, cpu: bool = False):
    """`profiled_steps` putting into `into` the share of the window's wall time the GPU was busy
    and its longest idle gaps (`busy_share`; with the GPU's activity only, the CPU side runs nearly
    unobserved). With `cpu` it records the CPU's operators and runtime calls too (which slows it),
    and names what the CPU ran during the longest gaps (`gap_ops`)."""
    import tempfile

    def done(prof, wall: float) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())
        found = idle_gaps(events)
        into.update(busy_share(found, wall * 1e6))
        if cpu:
            into["gap_ops"] = gap_ops(events, found)
    return profiled_steps(start, n, cpu, done)


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def idle_gaps(trace: dict) -> tuple[float, float, list[tuple[float, float]]]:
    """(busy us, first GPU event's start, idle gaps as (length, start) in us) of a chrome trace's
    kernel, copy and set events, overlaps merged."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace.get("traceEvents", [])
                   if e.get("ph") == "X" and e.get("cat") in GPU_CATS)
    if not spans:
        return 0.0, 0.0, []
    busy, idle, (lo, hi) = 0.0, [], spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy += hi - lo
            idle.append((a - hi, hi))
            lo, hi = a, b
        else:
            hi = max(hi, b)
    return busy + hi - lo, spans[0][0], idle


def gap_ops(trace: dict, found: tuple, gaps: int = 3, ops: int = 12) -> list[dict]:
    """For the longest GPU idle gaps (`found`: `idle_gaps` of `trace`): the innermost CPU events
    (operators, runtime calls) running during each, in order (name, ms from the gap's start, own
    ms), and the last device sync that returned before the gap began (a sync there is why the CPU
    was not ahead of the GPU)."""
    _, first, idle = found
    cpu = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") not in GPU_CATS]
    syncs = [e for e in cpu if "Synchronize" in e["name"] or e["name"] in ("cudaMemcpy", "aten::_local_scalar_dense")]
    out = []
    for length, a in sorted(idle, reverse=True)[:gaps]:
        b = a + length
        inner = sorted((e["ts"], e["name"][:80], e["dur"]) for e in cpu
                       if e["ts"] < b and e["ts"] + e["dur"] > a and e["dur"] < 2 * length)
        before = [e for e in syncs if e["ts"] + e["dur"] <= b]
        last = max(before, key=lambda e: e["ts"] + e["dur"], default=None)
        out.append({"gap_ms": round(length / 1e3, 2), "at_ms": round((a - first) / 1e3, 1),
                    "cpu": [[name, round((t - a) / 1e3, 2), round(d / 1e3, 2)] for t, name, d in inner[:ops]],
                    "last_sync": None if last is None else
                    [last["name"], round((last["ts"] + last["dur"] - a) / 1e3, 2), round(last["dur"] / 1e3, 2)]})
    return out


def busy_share(found: tuple, wall_us: float, gaps: int = 8) -> dict:
    """GPU busy share of `wall_us` (`found`: `idle_gaps` of a trace of that window), and the longest
    idle gaps (length, ms from the first GPU event)."""
    busy, first, idle = found
    if not busy:
        return {"gpu_busy_share": None}
    top = [(g, at - first) for g, at in sorted(idle, reverse=True)[:gaps]]
    return {"gpu_busy_share": round(busy / wall_us, 4), "gpu_busy_ms": round(busy / 1e3, 1),
            "wall_ms": round(wall_us / 1e3, 1),
            "idle_gaps_ms": [[round(g / 1e3, 2), round(at / 1e3, 1)] for g, at in top]}


MAX_EVENTS = 500_000
"""Allocator events one memory snapshot records."""


class MemProbe:
    """A TrainerCallback printing, for each step, memory allocated at its start, after the forward
    pass (the final norm's output) and the step's peak, in GiB; for the last warm-up step (so that
    recording slows no timed step) also what the step had allocated at its peak, grouped by where
    (`peak_breakdown`)."""

    def __new__(cls, model, record_step: int):
        import torch
        from transformers import TrainerCallback

        marks: dict = {}
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.get_decoder().norm.register_forward_hook(
            lambda *a: marks.__setitem__("after_forward", torch.cuda.memory_allocated() / 2**30))

        class _M(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                torch.cuda.reset_peak_memory_stats()
                marks["start"] = torch.cuda.memory_allocated() / 2**30
                if state.global_step == record_step:
                    torch.cuda.memory._record_memory_history(max_entries=MAX_EVENTS, stacks="python")

            def on_step_end(self, args, state, control, **kw):
                marks["peak"] = torch.cuda.max_memory_allocated() / 2**30
                print("mem", state.global_step, {k: round(v, 3) for k, v in marks.items()}, file=sys.stderr, flush=True)
                if state.global_step == record_step + 1:
                    snap = torch.cuda.memory._snapshot()
                    torch.cuda.memory._record_memory_history(enabled=None)
                    if len(snap["device_traces"][0]) >= MAX_EVENTS:
                        print("mem warning: the trace reached its event limit; the breakdown misses the step's start",
                              file=sys.stderr, flush=True)
                    for line in peak_breakdown(snap["device_traces"][0]):
                        print("mem", line, file=sys.stderr, flush=True)

        return _M()


def _where(frames: list) -> str:
    """A short label for an allocation's Python stack: its innermost frame and the innermost one in
    this project's code."""
    def short(f):
        return f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}"
    ours = next((f for f in frames if any(k in f["filename"] for k in ("/finetune/", "/bench/"))), None)
    return short(frames[0]) + (f" <- {short(ours)}" if ours and ours is not frames[0] else "") if frames else "?"


def peak_breakdown(trace: list, top: int = 14) -> list[str]:
    """Lines describing the moment a recorded step allocated most (beyond what was live when the
    recording began): the total, the allocation that reached it and the live blocks grouped by
    `_where`, largest first."""
    cur = peak = 0
    at = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            cur += e["size"]
            if cur > peak:
                peak, at = cur, i
        elif e["action"] == "free_completed":
            cur -= e["size"]
    live: dict = {}
    for e in trace[: at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, list] = {}
    for e in live.values():
        g = groups.setdefault(_where(e.get("frames", [])), [0, 0])
        g[0] += e["size"]
        g[1] += 1
    if at < 0:
        return ["no allocations recorded"]
    reached = _where(trace[at].get("frames", []))
    lines = [f"peak +{peak / 2**30:.3f} GiB at event {at}/{len(trace)}, reached by {reached}"]
    for where, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {size / 2**20:9.1f} MiB  {n:5d} blocks  {where}")
    return lines


def counting(collate, counts: list):
    """Wrap a collator: each batch's real tokens appended to `counts` in the order the batches are
    made, which is the order the steps take them (the loader only fetches ahead); no n_tokens key
    reaches the model."""
    def call(rows):
        batch = collate(rows)
        batch.pop("label_index", None)
        batch.pop("label_targets", None)
        n = batch.pop("n_tokens", None)
        counts.append(int(n) if n is not None else int((batch["labels"] != -100).sum()))
        return batch
    return call


def run_project(shape, exs, args, cfg, callbacks):
    from finetune.sft import train

    model = build(shape, args.targets, args.r)
    if args.mem_probe:
        callbacks = [*callbacks, MemProbe(model, args.warmup - 1)]
    res = train(model, Tok(), exs, cfg, "/tmp/bench_ft_project", method="lora", prec="bf16", progress=False,
                max_steps=total_steps(args), save=False, timing_from_step=args.warmup,
                timing_to_step=args.warmup + args.steps, callbacks=callbacks)
    out = {"tokens_per_s": res.tokens_per_s, "peak_mem_gib": res.peak_mem_gib, "first_loss": res.first_loss,
           "kernels": res.kernels}
    return model, out


def hf_side(side: str, shape, exs, args, cfg, callbacks):
    """baseline / recipe / recipe_packed through a plain transformers Trainer."""
    import torch
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from finetune.sft import PackedCollator, PaddedCollator, checkpointing_args, loop_args, pack, step_mark

    if side != "baseline":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    model = build(shape, args.targets, args.r)
    if args.mem_probe:
        callbacks = [*callbacks, MemProbe(model, args.warmup - 1)]
    counts: list[int] = []
    data: list = exs
    if side == "baseline":
        collate = PaddedCollator(0)
    elif side == "recipe":
        flat = DataCollatorWithFlattening(return_position_ids=True)
        data = [{"input_ids": e.input_ids, "labels": e.labels} for e in exs]
        collate = lambda rows: {**flat(rows), "n_tokens": sum(len(r["input_ids"]) for r in rows)}  # noqa: E731
    else:
        data = pack(exs, args.max_length)
        collate = PackedCollator(0, args.max_length)

    mark = step_mark(args.warmup, None, cuda=True, last=args.warmup + args.steps)  # times only; tokens from `counts`
    targs = TrainingArguments(output_dir=f"/tmp/bench_ft_{side}", per_device_train_batch_size=cfg.batch_size,
                              gradient_accumulation_steps=1, max_steps=total_steps(args), learning_rate=1e-4,
                              bf16=True, logging_steps=args.log_every, save_strategy="no", report_to=[],
                              disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
                              **checkpointing_args(cfg.gradient_checkpointing), **loop_args(on_cuda=True))
    model.config.use_cache = False
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=counting(collate, counts),
                      callbacks=[mark, *callbacks])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    torch.cuda.synchronize()
    if mark.t is None or mark.end is None:
        raise RuntimeError(f"{side}: training stopped before step {args.warmup + args.steps}")
    timed = sum(counts[args.warmup:args.warmup + args.steps])  # the batches of the timed steps
    return model, {"tokens_per_s": timed / (mark.end - mark.t),
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "first_loss": next(h["loss"] for h in trainer.state.log_history if "loss" in h)}


def child(args) -> None:
    """One side of one setting in this process; prints its result as JSON on the last line."""
    import torch

    from kb.settings import FinetuneConfig

    args.targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    shape, kind, side = args.shapes, args.lengths, args.child
    big = shape == "7b"
    rows = args.batch_rows or (4 if big else 8)
    cfg = FinetuneConfig(batch_size=rows, grad_accum=1, max_length=args.max_length, logging_steps=args.log_every,
                         gradient_checkpointing=big if args.checkpointing == "auto" else args.checkpointing == "on",
                         save_steps=10**9, warmup_ratio=0.0, learning_rate=1e-4, compile=args.compile)
    exs = bench_examples(shape, kind, cfg.batch_size, example_steps(args), args.max_length)
    callbacks = []
    if args.profile:
        path = os.path.join(args.profile, f"prof_{shape}_{kind}_{side}.txt")
        callbacks.append(kernel_table(path, args.warmup + 1, 2))
    busy: dict = {}
    if args.gpu_busy:
        callbacks.append(gpu_busy(busy, args.warmup + args.steps, BUSY_STEPS, cpu=args.gap_ops))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if side == "project":
        model, out = run_project(shape, exs, args, cfg, callbacks)
    else:
        model, out = hf_side(side, shape, exs, args, cfg, callbacks)
    mean_len = sum(map(len, exs)) / len(exs)
    p = linear_params(model)
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    attn_len, labelled = shares(exs)
    model_flops = flops_per_token(p, attn_len, labelled)
    out.update(utilisation(p, exs, side, cfg.gradient_checkpointing, out, peak))
    out["tokens_per_s"] = round(out["tokens_per_s"], 1)
    out["peak_mem_gib"] = round(out["peak_mem_gib"], 2)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out.update(busy)
    setting = {"shape": f"Qwen2.5-{shape}", "lengths": kind, "mean_example_tokens": round(mean_len, 1),
               "batch_rows": cfg.batch_size, "max_length": args.max_length, "lora_r": args.r,
               "lora_targets": args.targets, "gradient_checkpointing": cfg.gradient_checkpointing,
               "timed_steps": args.steps, "warmup_steps": args.warmup, "logging_steps": args.log_every,
               "busy_steps": total_steps(args) - args.warmup - args.steps, "example_steps": example_steps(args),
               "precision": "bf16", "compile": args.compile,
               "model_flops_per_token": model_flops, "labelled_share": round(labelled, 4),
               "attention_length": round(attn_len, 1), "peak_bf16_flops": peak}
    print(json.dumps({"setting": setting, "side": side, "result": out}), flush=True)


def total_steps(args) -> int:
    """Steps each side trains: warm-up, timed, and with --gpu-busy the recorded steps after them."""
    return args.warmup + args.steps + (BUSY_STEPS if args.gpu_busy else 0)


def example_steps(args) -> int:
    """Steps the examples are made for: always room for the --gpu-busy steps, so that recording
    them does not change the examples or the order the steps take them in."""
    return args.warmup + args.steps + BUSY_STEPS


def bench_examples(shape: str, kind: str, batch_rows: int, steps: int, max_length: int) -> list:
    """The examples every side of a setting trains on: enough rows for `steps` steps (and two to
    spare), six times as many SFT-shaped examples since several pack into a row."""
    n = (steps + 2) * batch_rows * (6 if kind == "sft" else 1)
    return examples(n, SHAPES[shape]["vocab_size"], kind, max_length)


def utilisation(p: dict, exs, side: str, checkpointing: bool, out: dict, peak: float) -> dict:
    """MFU (model FLOPs) and HFU (the FLOPs `side` does) of a side's result `out`, with its FLOPs
    done per token. The project's fused loss runs the head on labelled positions only; Liger's and
    the plain Trainer's run it on every position."""
    attn_len, labelled = shares(exs)
    model_flops = flops_per_token(p, attn_len, labelled)
    done = flops_per_token(p, attn_len, labelled if side == "project" else 1.0,
                           recomputed(side, p, checkpointing, out.get("kernels")), checkpointing)
    return {"mfu": round(out["tokens_per_s"] * model_flops / peak, 4) if peak else None,
            "flops_done_per_token": done, "hfu": round(out["tokens_per_s"] * done / peak, 4) if peak else None}


def run_side(args, shape: str, kind: str, side: str) -> dict | None:
    """`child` in a fresh process; its JSON, or None (with the error printed) when it failed."""
    cmd = [sys.executable, "-m", "bench.finetune", "--child", side, "--shapes", shape, "--lengths", kind,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--max-length", str(args.max_length),
           "--r", str(args.r), "--targets", args.targets, "--profile", args.profile,
           "--checkpointing", args.checkpointing, "--compile", args.compile, "--batch-rows", str(args.batch_rows),
           "--log-every", str(args.log_every)] \
        + (["--mem-probe"] if args.mem_probe else []) + (["--gpu-busy"] if args.gpu_busy else []) \
        + (["--gap-ops"] if args.gap_ops else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stderr.splitlines():
        if line.startswith("mem "):
            print(shape, kind, side, line, flush=True)
    if proc.returncode != 0:
        print(f"{shape} {kind} {side} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recount(name: str) -> Path:
    """Recompute the MFU and HFU of a result file with this file's formula (the examples and model
    shapes are deterministic), recording the recount beside the original provenance."""
    import torch

    from eval.report import provenance

    path = ROOT / "bench" / "results" / f"{name}.json"
    data = json.loads(path.read_text())
    for row in data["runs"]:
        s = row["setting"]
        shape = s["shape"].split("-")[-1].lower()
        with torch.device("meta"):
            p = linear_params(build(shape, s["lora_targets"], s["lora_r"], device="meta"))
        steps = s.get("example_steps", s["warmup_steps"] + s["timed_steps"] + s.get("busy_steps", 0))
        exs = bench_examples(shape, s["lengths"], s["batch_rows"], steps, s["max_length"])
        attn_len, labelled = shares(exs)
        s.update(model_flops_per_token=flops_per_token(p, attn_len, labelled), labelled_share=round(labelled, 4),
                 attention_length=round(attn_len, 1))
        for side in SIDES:
            if side in row:
                row[side].update(utilisation(p, exs, side, s["gradient_checkpointing"], row[side],
                                             s["peak_bf16_flops"]))
    prov = provenance()
    data["recounted"] = {"command": prov["command"], "commit": prov["commit"], "date": prov["date"],
                         "what": "mfu and hfu with the head counted on labelled positions only in model FLOPs (and in "
                                 "the project's FLOPs done), attention over sum(len^2)/sum(len)"}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


LABELS = {"project": "project", "baseline": "Trainer + peft", "recipe": "Liger + flattening",
          "recipe_packed": "Liger, packed rows"}


def plot(names: list[str], out: Path) -> Path:
    """Tokens/s of every side, one panel per result file, bars grouped by lengths; peak GiB on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(n, json.loads((ROOT / "bench" / "results" / f"{n}.json").read_text())["runs"]) for n in names]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4))
    for ax, (_name, rows) in zip(axes if len(runs) > 1 else [axes], runs):
        for j, side in enumerate(SIDES):
            xs = [i + (j - 1.5) * 0.2 for i in range(len(rows))]
            ys = [r.get(side, {}).get("tokens_per_s", 0) for r in rows]
            bars = ax.bar(xs, ys, 0.2, label=LABELS[side])
            for bar, r in zip(bars, rows):
                if side in r:
                    ax.annotate(f"{r[side]['peak_mem_gib']:.1f}", (bar.get_x() + 0.1, bar.get_height()), ha="center",
                                va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), [f"{r['setting']['lengths']} rows" for r in rows])
        ckpt = ", checkpointing" if rows[0]["setting"]["gradient_checkpointing"] else ""
        ax.set_title(f"{rows[0]['setting']['shape']}{ckpt} (GiB over bars)")
        ax.set_ylabel("tokens/s")
        ax.grid(axis="y", alpha=0.3)
    (axes[0] if len(runs) > 1 else axes).legend(fontsize=8)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="0.5b,7b")
    ap.add_argument("--lengths", default="full,sft", help="full and/or sft")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--profile", default="", help="a folder: top CUDA kernels of 2 timed steps per side")
    ap.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"),
                    help="activation checkpointing on every side (auto: on for 7b)")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off", "graphs"),
                    help="the project side's finetune.compile (graphs: compiled layers replayed as CUDA graphs)")
    ap.add_argument("--mem-probe", action="store_true",
                    help="print each side's memory at each step's start, after its forward and its peak, "
                         "and the first timed step's live blocks at its peak")
    ap.add_argument("--batch-rows", type=int, default=0, help="rows per step (0: 4 for 7b, 8 for 0.5b)")
    ap.add_argument("--log-every", type=int, default=10,
                    help="every side's logging interval (finetune.logging_steps' default); step 1 is always logged")
    ap.add_argument("--gpu-busy", action="store_true",
                    help="record the GPU's busy share over 2 steps after the timed ones (CUDA activity only) "
                         "and its idle gaps")
    ap.add_argument("--gap-ops", action="store_true",
                    help="with --gpu-busy: record the CPU side too and name what it ran in the longest GPU idle gaps")
    ap.add_argument("--name", default="finetune_gpu")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--plot", default="", help="result names (comma-separated): draw bench/results/finetune_gpu.png")
    ap.add_argument("--recount", default="", help="result names (comma-separated): recompute MFU/HFU in place")
    args = ap.parse_args()
    if args.gap_ops and not args.gpu_busy:
        ap.error("--gap-ops needs --gpu-busy")
    if args.recount:
        for name in args.recount.split(","):
            print(recount(name))
        return None
    if args.plot:
        print(plot(args.plot.split(","), ROOT / "bench" / "results" / "finetune_gpu.png"))
        return None
    if args.child:
        return child(args)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/finetune.py needs a CUDA GPU")
    runs = []
    for shape in args.shapes.split(","):
        for kind in args.lengths.split(","):
            row: dict = {}
            for side in args.sides.split(","):
                res = run_side(args, shape, kind, side)
                if res:
                    row["setting"] = res["setting"]
                    row[side] = res["result"]
                    print(shape, kind, side, res["result"], flush=True)
            for other in ("baseline", "recipe", "recipe_packed"):
                if "project" in row and other in row:
                    mine, theirs = row["project"], row[other]
                    row[f"speedup_vs_{other}"] = round(mine["tokens_per_s"] / theirs["tokens_per_s"], 2)
                    row[f"memory_ratio_vs_{other}"] = round(mine["peak_mem_gib"] / theirs["peak_mem_gib"], 2)
            if "setting" in row:
                runs.append(row)
    path = write_result(args.name, {"runs": runs})
    cols = ["shape", "lengths"] + [f"{s}_{k}" for s in SIDES for k in ("tokens_per_s", "peak_mem_gib")] + \
        ["project_mfu", "project_hfu", "speedup_vs_recipe", "speedup_vs_recipe_packed"]
    stats = ("tokens_per_s", "peak_mem_gib", "mfu", "hfu")
    print(table([{**r["setting"], **{f"{s}_{k}": r.get(s, {}).get(k) for s in SIDES for k in stats},
                  **{k: v for k, v in r.items() if k.startswith("speedup")}} for r in runs], cols))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
