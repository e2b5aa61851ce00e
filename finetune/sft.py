"""Supervised fine-tuning of the LLM on a transformers `Trainer` (DeepSpeed, torchrun, resume,
gradient accumulation and mixed precision come from it), made fast where plain SFT wastes time:

- the loss is on the replies only: prompt and history tokens are masked, in the model's own
  chat template (each turn rendered and tokenised as a segment, so the masks line up exactly);
- packing: short examples share a row, each with its own position ids; transformers turns
  restarting positions into a block-diagonal mask, so examples never attend to each other, and
  rows have a fixed width (no padding waste, one shape for the compiler);
- fused linear cross-entropy (`finetune.fused_loss`): the LM head and the loss run in chunks over
  the labelled positions only; the full [tokens x vocab] logits are never held;
- each decoder layer is compiled with torch.compile on CUDA (regional compilation), and with
  packed rows (one shape for every batch) replayed as CUDA graphs: the small layers of a small
  model are bound by kernel launches, not by the GPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from finetune.formats import Messages
from finetune.fused_loss import IGNORE, forward_final_hidden, fused_ce_sum, gathered, label_positions
from serve.llm import render_chat

log = logging.getLogger(__name__)


# tokenisation ---------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def segments(tok, messages: Messages) -> list[tuple[str, bool]]:
    """The conversation as (text, trainable) pieces in the model's chat template."""
    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render_chat(tok, messages[:i], add_generation_prompt=True)
        full = render_chat(tok, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations prefix-stably; cannot mask turns")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(t, trainable) for t, trainable in out if t]


def tokenize(tok, messages: Messages, max_length: int) -> Example:
    """Token ids and labels (IGNORE outside the replies); long examples keep their end."""
    ids: list[int] = []
    labels: list[int] = []
    eos = tok.eos_token_id
    for text, trainable in segments(tok, messages):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        if trainable and eos is not None and eos not in piece:
            piece = [*piece, eos]  # the model must learn to stop
        ids += piece
        labels += piece if trainable else [IGNORE] * len(piece)
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id) and \
            tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        ids, labels = [tok.bos_token_id, *ids], [IGNORE, *labels]
    ids, labels = ids[-max_length:], labels[-max_length:]
    labels[0] = IGNORE  # never predicted from the previous example in a packed row
    return Example(ids, labels)


def pack(examples: Sequence[Example], width: int) -> list[list[Example]]:
    """First-fit-decreasing bins of examples whose lengths sum to at most `width`."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        for b, r in enumerate(room):
            if len(ex) <= r:
                bins[b].append(ex)
                room[b] -= len(ex)
                break
        else:
            bins.append([ex])
            room.append(width - len(ex))
    return bins


class PackedCollator:
    """Rows of packed examples -> input_ids, labels, position_ids (restarting per example), no
    attention mask; rows padded to `width` with a padding "example" of their own. `n_tokens`, the
    real tokens, is a Python int: the loader moves tensors to the GPU, and reading one back syncs."""

    def __init__(self, pad_id: int, width: int) -> None:
        self.pad_id, self.width = pad_id, width

    def __call__(self, rows: list[list[Example]]) -> dict:
        ids, labels, pos, n = [], [], [], 0
        for row in rows:
            r_ids = [t for ex in row for t in ex.input_ids]
            r_lab = [t for ex in row for t in ex.labels]
            r_pos = [p for ex in row for p in range(len(ex))]
            n += len(r_ids)
            pad = self.width - len(r_ids)
            ids.append(r_ids + [self.pad_id] * pad)
            labels.append(r_lab + [IGNORE] * pad)
            pos.append(r_pos + list(range(pad)))
        labels_t = torch.tensor(labels)
        return {"input_ids": torch.tensor(ids), "labels": labels_t, "position_ids": torch.tensor(pos),
                "n_tokens": n, **label_positions(labels_t)}


class PaddedCollator:
    """One example per row, right-padded to the longest in the batch, with an attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[Example]) -> dict:
        width = max(len(r) for r in rows)
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        labels = torch.tensor(pad([r.labels for r in rows], IGNORE))
        return {"input_ids": torch.tensor(pad([r.input_ids for r in rows], self.pad_id)), "labels": labels,
                "attention_mask": torch.tensor(pad([[1] * len(r) for r in rows], 0)),
                "n_tokens": sum(len(r) for r in rows), **label_positions(labels)}


# trainer ----------------------------------------------------------------------------------------
class SFTTrainer(Trainer):
    """A transformers Trainer with the fused loss (`fused_ce`), real-token counting and tokens/s
    in its logs."""

    def __init__(self, *args, fused_ce: bool = True, cuda_graphs: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused_ce, self.cuda_graphs = fused_ce, cuda_graphs
        self.tokens = 0
        self._last_tokens, self._last_t = 0, time.perf_counter()

    def training_step(self, model, inputs, *args, **kwargs):
        """The Trainer's step. It counts the batch's real tokens from the collator's int (a count
        read back from the GPU would wait for the previous step to finish); with CUDA graphs it
        first tells the graph trees that a new step begins (the previous step's graph outputs are
        dead and their memory may be replayed over)."""
        n_tok = inputs.pop("n_tokens", None)
        self.tokens += n_tok if n_tok is not None else inputs["input_ids"].numel()
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The summed loss over labelled positions from the fused head, scaled as the Trainer scales it."""
        inputs.pop("n_tokens", None)  # counted in training_step; a prediction step still brings it
        index, targets = inputs.pop("label_index", None), inputs.pop("label_targets", None)
        if not self.fused_ce:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        # through the wrapped model (DDP/DeepSpeed see a forward), keeping one position's logits
        out, hidden = forward_final_hidden(model, self.accelerator.unwrap_model(model), inputs)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with gathered(head.weight):  # ZeRO-3: the frozen head, whole for the chunks (no-op otherwise)
            loss_sum, n = fused_ce_sum(hidden, head.weight, labels, index, targets)
        if num_items_in_batch is not None:
            loss = loss_sum / num_items_in_batch  # the count over all ranks and accumulation steps
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients
        else:
            loss = loss_sum / max(n, 1) / self.args.gradient_accumulation_steps
        return (loss, out) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """The Trainer's log line, with tokens/s since the last one."""
        now = time.perf_counter()
        if "loss" in logs:
            logs["tokens_per_s"] = round((self.tokens - self._last_tokens) / (now - self._last_t), 1)
            self._last_t, self._last_tokens = now, self.tokens
        super().log(logs, *args, **kwargs)


@dataclass
class TrainResult:
    out: str
    steps: int
    train_loss: float | None
    tokens_per_s: float
    peak_mem_gib: float
    tokens: int
    seconds: float
    first_loss: float | None = None
    world_size: int = 1
    kernels: dict | None = None

    def to_json(self) -> dict:
        return self.__dict__.copy()


def precision(cfg, device: str) -> str:
    """The training precision: `cfg.precision`, or for auto bf16 where supported, else fp16 on CUDA, fp32 on CPU."""
    if cfg.precision != "auto":
        return cfg.precision
    if not device.startswith("cuda"):
        from kb.models import cpu_has_bf16

        return "bf16" if cpu_has_bf16() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def adam_epsilon(cfg, prec: str) -> float:
    """fp16 cannot hold 1e-8 (its smallest subnormal is about 6e-8): the epsilon in Adam's
    denominator becomes 0 wherever optimizer math runs in half precision and updates blow up;
    1e-6 is the usual floor for fp16 training."""
    if prec == "fp16" and cfg.adam_epsilon < 1e-6:
        log.info("fp16: adam_epsilon %.0e -> 1e-6", cfg.adam_epsilon)
        return 1e-6
    return cfg.adam_epsilon


def head_frozen(model) -> bool:
    """Whether the LM head of `model` (maybe a peft model) takes no gradient."""
    head = model.get_output_embeddings()
    return head is not None and not any(p.requires_grad for p in head.parameters())


def zero_stage(path: str | None) -> int:
    """The ZeRO stage of a DeepSpeed JSON config; 0 without one."""
    if not path:
        return 0
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def load_for_training(spec: str, method: str, prec: str, device: str, *, adapter: str | None = None,
                      cfg=None):
    """The base model (4-bit for QLoRA), wrapped for `method`; `adapter` continues training one."""
    from transformers import AutoModelForCausalLM

    from kb.models import resolve_model

    path = resolve_model(spec, "llm")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
    kwargs: dict = {"dtype": dtype if method != "full" else torch.float32}
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise ValueError("QLoRA needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from e
        if not device.startswith("cuda"):
            raise ValueError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels)")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", **kwargs)
    if method == "full":
        return model
    from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        checkpointing = bool(cfg and cfg.gradient_checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if adapter:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    if method == "ptuning":
        return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_tokens))
    lc = cfg.lora
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=lc.target_modules))


def compile_layers(model, graphs: bool = False) -> int:
    """torch.compile each decoder layer in place (same code per layer: one compilation); with
    `graphs` in the CUDA-graph mode."""
    from finetune.fused_layers import GRAPHS_MODE

    layers = getattr(model.get_decoder(), "layers", [])
    for layer in layers:
        layer.compile(**({"mode": GRAPHS_MODE} if graphs else {}))
    return len(layers)


def compile_choice(cfg, method: str, on_cuda: bool, fixed_width: bool) -> tuple[bool, bool]:
    """(compile the decoder layers, replay them as CUDA graphs) for `cfg.compile`: on compiles,
    graphs compiles and replays, auto compiles on CUDA without DeepSpeed (not for prefix tuning)
    and replays too where every batch has one shape (`fixed_width`: packed rows through the fused
    layers; measured on an H200, bench/results/finetune_gpu_0.5b_graphs*.json)."""
    auto = cfg.compile == "auto" and on_cuda and not cfg.deepspeed and method != "ptuning"
    return cfg.compile in ("on", "graphs") or auto, cfg.compile == "graphs" or (auto and fixed_width)


def fused_layers_wanted(cfg, method: str, on_cuda: bool) -> bool:
    """Whether `finetune.fused_layers` applies: never for prefix tuning, under ZeRO-3 (sharded
    weights) or the Trainer's single-process DataParallel (replicas would share the bound forward)."""
    if cfg.fused_layers == "off" or method == "ptuning" or zero_stage(cfg.deepspeed) >= 3:
        return False
    data_parallel = torch.cuda.is_available() and torch.cuda.device_count() > 1 and \
        int(os.environ.get("WORLD_SIZE", "1")) <= 1
    if data_parallel:
        return False
    return cfg.fused_layers == "on" or (on_cuda and not cfg.deepspeed and method == "lora")


def train(model, tok, examples: Sequence[Example], cfg, out: str | Path, *, method: str = "lora",
          prec: str = "fp32", resume: bool = False, progress: bool = True, max_steps: int | None = None,
          save: bool = True, timing_from_step: int = 0, timing_to_step: int | None = None,
          callbacks: Sequence = ()) -> TrainResult:
    """Fine-tune `model` on tokenised examples with the settings `cfg` (settings.finetune).
    tokens/s counts real (not padding) tokens from the end of step `timing_from_step` (benchmarks skip
    warm-up) to the end of step `timing_to_step` (default: the end of training, with its wrap-up;
    without `timing_from_step`, the whole run)."""
    from torch.utils.data import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise ValueError("finetune.deepspeed is set but DeepSpeed is not installed (pip install deepspeed)") from e
    packing = cfg.packing and method != "ptuning"  # prefix tuning's virtual tokens do not pack
    # under ZeRO-3 the head is partitioned outside its module's forward: the fused loss gathers it
    # when it is frozen (LoRA), and stays off for a trainable head (full fine-tuning)
    fused = cfg.fused_ce and method != "ptuning" and (zero_stage(cfg.deepspeed) < 3 or head_frozen(model))
    on_cuda = next(model.parameters()).device.type == "cuda" or torch.cuda.is_available()
    from finetune.fused_layers import calls as fused_calls
    from finetune.fused_layers import install, keep_grads

    fused_wanted = fused_layers_wanted(cfg, method, on_cuda)
    compiled, graphs = compile_choice(cfg, method, on_cuda, fixed_width=packing and fused_wanted)
    fused_layers = install(model, recompute=cfg.gradient_checkpointing, compile=compiled, graphs=graphs) \
        if fused_wanted else 0
    if compiled and not fused_layers:
        graphs = cfg.compile == "graphs"  # auto replays only the fused layers
        compile_layers(model, graphs)
    if graphs and cfg.grad_accum > 1:
        keep_grads(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # no KV cache in training: with one, transformers skips the packed-sequence mask (examples
    # in a row would attend to each other) and keeps tensors it never needs
    model.config.use_cache = False  # a peft model's config is its base model's
    rows: list = pack(examples, cfg.max_length) if packing else list(examples)
    collator = PackedCollator(pad, cfg.max_length) if packing else PaddedCollator(pad)

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    args = training_args(cfg, out, prec=prec, on_cuda=on_cuda, max_steps=max_steps, save=save, progress=progress,
                         hf_checkpointing=cfg.gradient_checkpointing and not fused_layers)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Rows(), data_collator=collator, fused_ce=fused,
                           cuda_graphs=graphs)
    for cb in callbacks:
        trainer.add_callback(cb)
    if fused:
        trainer.loss_is_scaled_for_ga = True
    mark = step_mark(timing_from_step, lambda: trainer.tokens, on_cuda, last=timing_to_step) \
        if timing_from_step else None
    if mark is not None:
        trainer.add_callback(mark)
    last = get_last_checkpoint(str(out)) if resume else None
    if resume and last is None:
        log.info("no checkpoint in %s: starting from the beginning", out)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is for results
        result = trainer.train(resume_from_checkpoint=last)
    if on_cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    seconds = end - t0
    timed_tokens, timed_s = timed_window(mark, trainer.tokens, t0, end)
    world = max(1, args.world_size)  # every rank trains on its own rows: tokens/s counts all of them
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else _rss_gib()
    main_rank = trainer.is_world_process_zero()
    if save:
        trainer.save_model(str(out))  # gathers ZeRO-3 shards; writes on the main process
        if main_rank:
            tok.save_pretrained(str(out))
            plot_loss(trainer.state.log_history, out / "loss.png")
    res = TrainResult(str(out), int(result.global_step), finite(result.training_loss, 4),
                      round(world * timed_tokens / timed_s, 1), round(peak, 3), world * trainer.tokens,
                      round(seconds, 2),
                      finite(next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)), world,
                      {"fused_layers": fused_layers, "fused_layer_calls": fused_calls(model) if fused_layers else 0,
                       "fused_ce": fused, "compiled": compiled, "cuda_graphs": graphs,
                       "cudagraph_skips": _cudagraph_skips(), "packing": packing})
    if save and main_rank:
        (out / "train_result.json").write_text(json.dumps({**res.to_json(), "method": method, "precision": prec,
                                                           "packing": packing, "fused_ce": fused}, indent=2))
    return res


def loop_args(on_cuda: bool) -> dict:
    """TrainingArguments of the Trainer's loop that every SFT run shares (the benchmark's Hugging
    Face sides too). No device sync in a step, so the CPU launches the next step while the GPU
    still runs this one: batches go to the GPU from pinned memory without waiting (accelerate's
    non_blocking), and the NaN filter, which reads every step's loss on the CPU, is off (a NaN
    loss then shows as NaN in the log). The first step's loss is logged (`first_loss`)."""
    return {"logging_nan_inf_filter": False, "logging_first_step": True, "dataloader_pin_memory": on_cuda,
            "accelerator_config": {"non_blocking": on_cuda}}


def training_args(cfg, out: Path, *, prec: str, on_cuda: bool, max_steps: int | None, save: bool, progress: bool,
                  hf_checkpointing: bool):
    """The Trainer's arguments for settings `cfg` (settings.finetune). warmup_steps takes a float
    < 1 as a ratio of the updates; `hf_checkpointing`: transformers' own activation checkpointing
    (the fused layers checkpoint inside their compiled graph instead)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs, max_steps=max_steps if max_steps is not None else cfg.max_steps,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler, adam_epsilon=adam_epsilon(cfg, prec), bf16=prec == "bf16",
        fp16=prec == "fp16", logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, deepspeed=cfg.deepspeed, **checkpointing_args(hf_checkpointing),
        remove_unused_columns=False, report_to=[], disable_tqdm=not progress, seed=cfg.seed,
        save_strategy="steps" if save else "no", use_cpu=not on_cuda, **loop_args(on_cuda))


def timed_window(mark, tokens: int, start: float, end: float) -> tuple[int, float]:
    """(tokens, seconds) that tokens/s is taken over: between the step marks of `mark` (a
    `step_mark`) where both were reached, from its first mark to `end` where only that one was,
    else the whole run (`tokens` trained from `start` to `end`)."""
    if mark is None or mark.t is None:
        return tokens, end - start
    if mark.end is not None:
        return mark.n_end - mark.n, mark.end - mark.t
    return tokens - mark.n, end - mark.t


def finite(x: float | None, digits: int | None = None) -> float | None:
    """`x` (rounded to `digits` when given), or None when it is missing, NaN or infinite (JSON has
    no NaN: `train_result.json` would not parse)."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits) if digits is not None else float(x)


def step_mark(step: int, count: Callable[[], int] | None, cuda: bool, last: int | None = None):
    """A TrainerCallback timing throughput past the warm-up: at the end of step `step` it notes
    the time in `.t` (None until then) and `count()` in `.n`; at the end of step `last`, when
    given, the time in `.end` (None until then) and `count()` in `.n_end` (the counts stay 0
    without `count`). With `cuda` it synchronizes first."""
    from transformers import TrainerCallback

    class StepMark(TrainerCallback):
        t: float | None = None
        n: int = 0
        end: float | None = None
        n_end: int = 0

        def on_step_end(self, args, state, control, **kw):
            if cuda and state.global_step in (step, last):
                torch.cuda.synchronize()
            if state.global_step == step:
                self.t, self.n = time.perf_counter(), count() if count else 0
            if state.global_step == last:
                self.end, self.n_end = time.perf_counter(), count() if count else 0

    return StepMark()


def checkpointing_args(on: bool) -> dict:
    """TrainingArguments for activation checkpointing (named so only when on: the name changed in v5)."""
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} if on else {}


def _cudagraph_skips() -> int:
    """How many compiled graphs inductor ran without CUDA graphs (in this process)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plot_loss(history: list[dict], path: Path) -> Path | None:
    """The training loss by step, saved beside the checkpoint."""
    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def finetune_llm(settings, data: str | Path, out: str | Path, *, method: str | None = None, model: str | None = None,
                 adapter: str | None = None, resume: bool = False, progress: bool = True,
                 max_steps: int | None = None) -> dict:
    """`kb finetune llm`: load, tokenise, train, save; returns the DESIGN.md JSON."""
    from transformers import AutoTokenizer

    from finetune.formats import load_conversations
    from kb.models import pick_device, resolve_model

    cfg = settings.finetune
    method = method or cfg.method
    spec = model or settings.models.llm
    if not spec:
        raise ValueError("no base model: pass --model or set models.llm")
    conv, problems = load_conversations(data)
    for p in problems:
        log.warning("%s", p)
    if not conv:
        raise ValueError(f"no usable examples in {data}")
    device = pick_device(settings.models.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun/deepspeed: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    prec = precision(cfg, device)
    tok = AutoTokenizer.from_pretrained(str(resolve_model(spec, "llm")))
    examples = [tokenize(tok, m, cfg.max_length) for m in conv]
    examples = [e for e in examples if any(x != IGNORE for x in e.labels)]
    adapter = str(resolve_model(adapter, "adapter")) if adapter else None
    m = load_for_training(spec, method, prec, device, adapter=adapter, cfg=cfg)
    if not cfg.deepspeed and method != "qlora":
        m = m.to(device)
    res = train(m, tok, examples, cfg, out, method=method, prec=prec, resume=resume, progress=progress,
                max_steps=max_steps)
    return {**res.to_json(), "method": method, "examples": len(examples), "skipped_rows": problems,
            "loss_plot": str(Path(out) / "loss.png")}


def merge_adapter(base: str, adapter: str | Path, out: str | Path) -> dict:
    """Fold a LoRA adapter into the base weights; writes a plain model folder (write, then rename)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kb.fsutil import building_dir, umask_mode
    from kb.models import resolve_model

    pc = PeftConfig.from_pretrained(str(adapter))
    if pc.peft_type.value != "LORA":
        raise ValueError(f"only LoRA adapters can be merged into the weights ({pc.peft_type.value} cannot)")
    path = resolve_model(base, "llm")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    tok_src = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else path
    with building_dir(out, mode=umask_mode(0o777)) as tmp:
        merged.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(str(tmp))
    return {"out": str(out), "base": base, "adapter": str(adapter),
            "params": sum(p.numel() for p in merged.parameters())}
