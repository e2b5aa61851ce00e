"""Fine-tuning of the embedding model on `{"query", "pos", "neg"}` pairs (`kb finetune embed`).

sentence-transformers' MultipleNegativesRankingLoss: each query against its positive, the other
positives of the batch (in-batch negatives) and its mined hard negatives. Batches never hold two
examples with the same positive (that would punish the right answer). Characters the tokenizer
maps to [UNK] can be added as tokens first (`finetune.embed_add_chars`): the packaged English
MiniLM otherwise cannot tell most Chinese characters apart. Full or LoRA (merged on save); the
result is a sentence-transformers folder that `models.embedder` can point at. Queries and passages
carry the model's `query` / `passage` prompts (E5), as the Embedder adds them at run time; the
saved folder keeps the prompts.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
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


def finetune_embedder(settings, data: str | Path, out: str | Path, *, model: str | None = None,
                      progress: bool = True, max_steps: int | None = None) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from finetune.formats import load_pairs
    from finetune.sft import plot_loss
    from ingest.nsp import add_unknown_chars
    from kb.fsutil import replace_dir
    from kb.models import pick_device, resolve_model
    from retrieval.embedder import model_prompts

    cfg = settings.finetune
    pairs, problems = load_pairs(data)
    for p in problems:
        log.warning("%s", p)
    if not pairs:
        raise ValueError(f"no usable examples in {data}")
    spec = model or settings.models.embedder
    device = pick_device(settings.models.device)
    st = SentenceTransformer(str(resolve_model(spec, "embedder")), device=device)
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
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    loss_fn = MultipleNegativesRankingLoss(st)
    prompts = model_prompts(st)
    prepare = getattr(st, "preprocess", None) or st.tokenize
    rng = random.Random(cfg.seed)
    epochs = max(1, int(round(cfg.embed_epochs)))
    plan = [b for _ in range(epochs) for b in batches(pairs, cfg.embed_batch_size, rng)]
    if max_steps is not None:
        plan = plan[:max_steps]
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.embed_learning_rate)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * len(plan)), len(plan))
    use_amp = device.startswith("cuda")
    st.train()
    history, t0, seen, tokens = [], time.perf_counter(), 0, 0
    bar = tqdm(plan, desc="embed fine-tune", unit="batch", disable=not progress)
    for step, batch in enumerate(bar, 1):
        n_neg = min(cfg.hard_negatives, min(len(p["neg"]) for p in batch))
        columns = batch_columns(batch, n_neg, prompts)
        features = [{k: v.to(device) if hasattr(v, "to") else v for k, v in prepare(col).items()} for col in columns]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += len(batch)
        tokens += sum(int(f["attention_mask"].sum()) for f in features)
        history.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", pairs_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
    seconds = time.perf_counter() - t0
    st.eval()
    if cfg.embed_method == "lora":
        peft_model.merge_and_unload()  # folds the adapters into `hf`, which the pipeline holds
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    st.save(str(tmp))
    plot_loss(history, tmp / "loss.png")
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_amp else 0.0
    result = {"out": str(out), "steps": len(plan), "train_loss": round(sum(h["loss"] for h in history[-10:]) /
                                                                      max(1, len(history[-10:])), 4),
              "pairs_per_s": round(seen / seconds, 1), "tokens_per_s": round(tokens / seconds, 1), "peak_mem_gib": round(peak, 3),
              "examples": len(pairs), "added_tokens": added, "method": cfg.embed_method, "seconds": round(seconds, 2),
              "skipped_rows": problems}
    (tmp / "train_result.json").write_text(json.dumps(result, indent=2))
    replace_dir(tmp, out)
    return result
