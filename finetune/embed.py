"""Fine-tuning of the embedding model on `{"query", "pos", "neg"}` pairs (`kb finetune embed`).

sentence-transformers' MultipleNegativesRankingLoss: each query against its positive, the other
positives of the batch (in-batch negatives) and its mined hard negatives. Batches never hold two
examples with the same positive (that would punish the right answer). Characters the tokenizer
maps to [UNK] can be added as tokens first (`finetune.embed_add_chars`): the packaged English
MiniLM otherwise cannot tell most Chinese characters apart. Full or LoRA (merged on save); the
result is a sentence-transformers folder that `models.embedder` can point at. Queries and passages
carry the model's `query` / `passage` prompts (E5), as the Embedder adds them at run time; the
saved folder keeps the prompts.

On CUDA the loop tokenises in DataLoader workers (pinned, copied without blocking), runs the model
under bf16 autocast with SDPA attention, steps a fused AdamW and reads the loss back only every
`log_every` steps, so the host never waits on the GPU inside a step.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def batches(pairs: list[dict], size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffled batches without a repeated positive inside any batch."""
    pending = pairs[:]
    rng.shuffle(pending)
    out: list[list[dict]] = []
    while pending:
        batch, seen, rest = [], set(), []
        for p in pending:
            if len(batch) < size and p["pos"][0] not in seen:
                batch.append(p)
                seen.add(p["pos"][0])
            else:
                rest.append(p)
        out.append(batch)
        pending = rest
    return out


def batch_columns(batch: list[dict], n_neg: int, prompts: dict[str, str]) -> list[list[str]]:
    """The loss's columns: queries, positives, then `n_neg` columns of hard negatives, each text
    with its kind's prompt (none when the model has no prompts)."""
    q, p = prompts.get("query", ""), prompts.get("passage", "")
    columns = [[q + x["query"] for x in batch], [p + x["pos"][0] for x in batch]]
    return columns + [[p + x["neg"][j] for x in batch] for j in range(n_neg)]


def lora_config(cfg, train_embeddings: bool):
    """`finetune.lora` as a peft LoraConfig for the encoder (word embeddings trained in full
    when characters were added)."""
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                      target_modules=["query", "key", "value", "dense"],
                      modules_to_save=["word_embeddings"] if train_embeddings else None)


def load_sentence_transformer(path: str | Path, device: str):
    """A SentenceTransformer with SDPA attention where its architecture has it."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path), device=device, model_kwargs={"attn_implementation": "sdpa"})
    except (ValueError, ImportError, TypeError) as e:
        log.info("no SDPA attention for %s (%s); the model's default attention", path, e)
        return SentenceTransformer(str(path), device=device)


@dataclass
class EmbedTrainOptions:
    """What one run of the loop needs beyond the model and the pairs."""

    batch_size: int = 32
    learning_rate: float = 2e-5
    epochs: float = 1.0
    hard_negatives: int = 3
    seed: int = 42
    max_steps: int | None = None
    timing_from_step: int = 0
    """Throughput is timed from the end of this step (0: from the start)."""
    workers: int | None = None
    """DataLoader workers that tokenise (None: 2 on CUDA, 0 elsewhere)."""
    log_every: int = 10
    progress: bool = True
    plan: list[list[dict]] | None = None
    """These batches in this order instead of shuffled ones (`epochs` and `seed` then unused)."""


class _Collate:
    """Tokenised columns of one batch, with its example and real-token counts (in a worker)."""

    def __init__(self, prepare, prompts: dict[str, str], hard_negatives: int) -> None:
        self.prepare, self.prompts, self.hard_negatives = prepare, prompts, hard_negatives

    def __call__(self, batch: list[dict]) -> tuple[list[dict], int, int]:
        n_neg = min(self.hard_negatives, min(len(p["neg"]) for p in batch))
        features = [dict(self.prepare(col)) for col in batch_columns(batch, n_neg, self.prompts)]
        return features, len(batch), sum(int(f["attention_mask"].sum()) for f in features)


def make_loader(plan: list[list[dict]], collate: _Collate, cuda: bool, workers: int | None):
    """Batches of `plan` tokenised by `collate` in `workers` processes (default: 2 on CUDA, 0 elsewhere)."""
    from torch.utils.data import DataLoader

    workers = (2 if cuda else 0) if workers is None else workers
    extra = {"multiprocessing_context": "fork", "prefetch_factor": 4} if workers else {}
    return DataLoader(plan, batch_size=None, shuffle=False, collate_fn=collate, num_workers=workers,
                      pin_memory=cuda, **extra)


def train_embedder(st, pairs: list[dict], opts: EmbedTrainOptions, device: str) -> dict:
    """MultipleNegativesRankingLoss steps over `pairs` on `st` (its trainable parameters): the
    loss history, throughput (examples and real tokens per second) and CUDA peak memory."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from retrieval.embedder import model_prompts

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    cuda = device.startswith("cuda")
    loss_fn = MultipleNegativesRankingLoss(st)
    prepare = getattr(st, "preprocess", None) or st.tokenize
    rng = random.Random(opts.seed)
    epochs = max(1, int(round(opts.epochs)))
    plan = opts.plan or [b for _ in range(epochs) for b in batches(pairs, opts.batch_size, rng)]
    if opts.max_steps is not None:
        plan = plan[:opts.max_steps]
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts.learning_rate, fused=cuda or None)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * len(plan)), len(plan))
    loader = make_loader(plan, _Collate(prepare, model_prompts(st), opts.hard_negatives), cuda, opts.workers)
    st.train()
    losses, seen, tokens, mark = [], 0, 0, (time.perf_counter(), 0, 0)
    bar = tqdm(loader, total=len(plan), desc="embed fine-tune", unit="batch", disable=not opts.progress)
    for step, (features, n_ex, n_tok) in enumerate(bar, 1):
        features = [{k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in f.items()}
                    for f in features]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        seen, tokens = seen + n_ex, tokens + n_tok
        if step == opts.timing_from_step:
            if cuda:
                torch.cuda.synchronize()
            mark = (time.perf_counter(), seen, tokens)
        if opts.progress and (step % opts.log_every == 0 or step == len(plan)):
            rate = seen / (time.perf_counter() - mark[0])
            bar.set_postfix(loss=f"{losses[-1].item():.3f}", pairs_per_s=f"{rate:.0f}")
    if cuda:
        torch.cuda.synchronize()
    seconds = max(time.perf_counter() - mark[0], 1e-9)
    history = [{"step": i, "loss": v} for i, v in enumerate(torch.stack(losses).float().tolist() if losses else [], 1)]
    return {"history": history, "steps": len(plan), "seconds": seconds, "examples": seen,
            "first_loss": history[0]["loss"] if history else float("nan"),
            "pairs_per_s": (seen - mark[1]) / seconds, "tokens_per_s": (tokens - mark[2]) / seconds,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}


def finetune_embedder(settings, data: str | Path, out: str | Path, *, model: str | None = None,
                      progress: bool = True, max_steps: int | None = None) -> dict:
    """Fine-tune the embedder on query/passage pairs from `data`, save it to `out`; the training summary."""
    from finetune.formats import load_pairs
    from finetune.sft import plot_loss
    from ingest.nsp import add_unknown_chars
    from kb.fsutil import building_dir, umask_mode
    from kb.models import pick_device, resolve_model

    cfg = settings.finetune
    pairs, problems = load_pairs(data)
    for p in problems:
        log.warning("%s", p)
    if not pairs:
        raise ValueError(f"no usable examples in {data}")
    spec = model or settings.models.embedder
    device = pick_device(settings.models.device)
    st = load_sentence_transformer(resolve_model(spec, "embedder"), device)
    st.max_seq_length = cfg.embed_max_length
    hf = st[0].auto_model
    added = 0
    if cfg.embed_add_chars:
        texts = [t for p in pairs for t in (p["query"], *p["pos"], *p["neg"])]
        added = add_unknown_chars(st.tokenizer, hf, texts)
        st.to(device)
    if cfg.embed_method == "lora":
        from peft import get_peft_model

        # get_peft_model injects the adapters into `hf` in place
        peft_model = get_peft_model(hf, lora_config(cfg, added > 0))
    opts = EmbedTrainOptions(batch_size=cfg.embed_batch_size, learning_rate=cfg.embed_learning_rate,
                             epochs=cfg.embed_epochs, hard_negatives=cfg.hard_negatives, seed=cfg.seed,
                             max_steps=max_steps, progress=progress)
    res = train_embedder(st, pairs, opts, device)
    history, seconds = res["history"], res["seconds"]
    st.eval()
    if cfg.embed_method == "lora":
        peft_model.merge_and_unload()  # folds the adapters into `hf`, which the pipeline holds
    out = Path(out)
    result = {"out": str(out), "steps": res["steps"], "train_loss": round(sum(h["loss"] for h in history[-10:]) /
                                                                       max(1, len(history[-10:])), 4),
              "pairs_per_s": round(res["pairs_per_s"], 1), "tokens_per_s": round(res["tokens_per_s"], 1),
              "peak_mem_gib": round(res["peak_mem_gib"], 3), "examples": len(pairs), "added_tokens": added,
              "method": cfg.embed_method, "seconds": round(seconds, 2), "skipped_rows": problems}
    with building_dir(out, mode=umask_mode(0o777)) as tmp:
        st.save(str(tmp))
        plot_loss(history, tmp / "loss.png")
        (tmp / "train_result.json").write_text(json.dumps(result, indent=2))
    return result
