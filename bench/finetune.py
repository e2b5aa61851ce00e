"""LLM fine-tuning throughput: the project's trainer against a plain transformers Trainer + peft
LoRA with the same settings, in the same run, on the same examples and the same initial weights.

Random weights of real shapes (speed does not depend on the weights). Examples are SFT-shaped:
a prompt (RAG context + question, masked) and a reply (trained), lengths drawn from a fixed
distribution (`--lengths sft`: prompts 64-900 tokens, replies 16-256), or every example exactly
`--max-length` tokens (`--lengths full`: no padding for either side, so only kernels and the loss
differ). The baseline pads each batch to its longest example and computes the loss from full
logits, as the Trainer does by default; the project packs examples into full rows (each with its
own positions and attention), fuses the LM head with the loss over reply tokens only, and
compiles the decoder layers. Both count real tokens only; MFU uses the same formula for both.

    python bench/finetune.py --shapes 0.5b,7b --name finetune_gpu      # on the GPU machine
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import table, write_result  # noqa: E402
from bench.generate import SHAPES  # noqa: E402

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


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


def build(shape: str, targets: list[str] | str, r: int, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=targets))


def linear_params(model) -> tuple[int, int, int]:
    """(weights of the decoder's linear layers + LM head, layers, hidden size)."""
    import torch

    base = model.get_base_model()
    n = sum(m.weight.numel() for name, m in base.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    return n, base.config.num_hidden_layers, base.config.hidden_size


def mfu(tokens_per_s: float, n_linear: int, layers: int, d_model: int, mean_len: float, full: bool,
        peak_flops: float) -> float:
    """Model FLOPs utilisation: forward 2 flops per weight and 2*len*d per layer for causal
    attention; backward twice that for activations, plus weight gradients only when all weights train."""
    fwd = 2 * n_linear + 2 * layers * mean_len * d_model
    per_token = fwd * 3 if full else fwd * 3 - 2 * n_linear
    return tokens_per_s * per_token / peak_flops if peak_flops else float("nan")


class Tok:
    """What the trainers need of a tokenizer: pad and eos ids."""

    pad_token_id = 0
    eos_token_id = 1
    eos_token = pad_token = "<pad>"


def run_project(shape, exs, args, cfg):
    from finetune.sft import train

    model = build(shape, args.targets, args.r)
    res = train(model, Tok(), exs, cfg, "/tmp/bench_ft_project", method="lora", prec="bf16", progress=False,
                max_steps=args.warmup + args.steps, save=False, timing_from_step=args.warmup)
    return model, res


def run_baseline(shape, exs, args, cfg):
    """transformers Trainer + peft, defaults: padded batches, loss from the model's logits."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from finetune.sft import PaddedCollator, _checkpointing

    model = build(shape, args.targets, args.r)
    pad = PaddedCollator(0)
    tokens = {"n": 0, "mark": 0, "t": None}

    def collate(rows):
        batch = pad(rows)
        tokens["n"] += int(batch.pop("n_tokens"))
        return batch

    class Mark(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                torch.cuda.synchronize()
                tokens["t"], tokens["mark"] = time.perf_counter(), tokens["n"]

    targs = TrainingArguments(output_dir="/tmp/bench_ft_baseline", per_device_train_batch_size=cfg.batch_size,
                              gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=1e-4,
                              bf16=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                              remove_unused_columns=False, dataloader_num_workers=0, **_checkpointing(cfg.gradient_checkpointing))
    trainer = Trainer(model=model, args=targs, train_dataset=exs, data_collator=collate, callbacks=[Mark()])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    torch.cuda.synchronize()
    # the loader may fetch one batch ahead: at the mark and at the end alike, so the count holds
    return model, {"tokens_per_s": (tokens["n"] - tokens["mark"]) / (time.perf_counter() - tokens["t"]),
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "first_loss": next(h["loss"] for h in trainer.state.log_history if "loss" in h)}


def main() -> None:
    import torch

    from kb.settings import FinetuneConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="0.5b,7b")
    ap.add_argument("--lengths", default="sft,full", help="sft and/or full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--sides", default="project,baseline")
    ap.add_argument("--name", default="finetune_gpu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/finetune.py needs a CUDA GPU")
    args.targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    runs = []
    for shape in args.shapes.split(","):
        big = shape == "7b"
        cfg = FinetuneConfig(batch_size=4 if big else 8, grad_accum=1, max_length=args.max_length, logging_steps=1,
                             gradient_checkpointing=big, save_steps=10**9, warmup_ratio=0.0, learning_rate=1e-4)
        for kind in args.lengths.split(","):
            n_ex = (args.warmup + args.steps + 2) * cfg.batch_size * (6 if kind == "sft" else 1)
            exs = examples(n_ex, SHAPES[shape]["vocab_size"], kind, args.max_length)
            mean_len = sum(map(len, exs)) / len(exs)
            setting = {"shape": f"Qwen2.5-{shape}", "lengths": kind, "mean_example_tokens": round(mean_len, 1),
                       "batch_rows": cfg.batch_size, "max_length": args.max_length, "lora_r": args.r,
                       "lora_targets": args.targets, "gradient_checkpointing": cfg.gradient_checkpointing,
                       "timed_steps": args.steps, "warmup_steps": args.warmup, "precision": "bf16"}
            row = {"setting": setting}
            for side in args.sides.split(","):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                if side == "project":
                    model, res = run_project(shape, exs, args, cfg)
                    out = {"tokens_per_s": res.tokens_per_s, "peak_mem_gib": res.peak_mem_gib, "first_loss": res.first_loss,
                           "packing": True, "fused_ce": True, "compiled_layers": True}
                else:
                    model, out = run_baseline(shape, exs, args, cfg)
                n_lin, layers, d = linear_params(model)
                out["mfu"] = round(mfu(out["tokens_per_s"], n_lin, layers, d, mean_len, False, peak), 4)
                out["tokens_per_s"] = round(out["tokens_per_s"], 1)
                out["peak_mem_gib"] = round(out["peak_mem_gib"], 2)
                out["wall_s"] = round(time.perf_counter() - t0, 1)
                row[side] = out
                print(shape, kind, side, out, flush=True)
                del model
                gc.collect()
                torch.cuda.empty_cache()
            if "project" in row and "baseline" in row:
                row["speedup"] = round(row["project"]["tokens_per_s"] / row["baseline"]["tokens_per_s"], 2)
                row["memory_ratio"] = round(row["project"]["peak_mem_gib"] / row["baseline"]["peak_mem_gib"], 2)
            runs.append(row)
    path = write_result(args.name, {"peak_bf16_flops": peak, "runs": runs})
    print(table([{**r["setting"], **{f"{s}_{k}": r.get(s, {}).get(k) for s in ("project", "baseline")
                                     for k in ("tokens_per_s", "peak_mem_gib", "mfu")},
                  "speedup": r.get("speedup")} for r in runs],
                ["shape", "lengths", "mean_example_tokens", "project_tokens_per_s", "baseline_tokens_per_s", "speedup",
                 "project_peak_mem_gib", "baseline_peak_mem_gib", "project_mfu", "baseline_mfu"]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
