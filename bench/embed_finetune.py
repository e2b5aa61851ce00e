"""Embedder fine-tuning throughput: the project's loop (finetune/embed.py, `kb finetune embed`)
against sentence-transformers' trainer (SentenceTransformerTrainer + MultipleNegativesRankingLoss +
BatchSamplers.NO_DUPLICATES), in one run, on the same (query, pos, neg) triples, from the same
weights, with the same batch size, prompts, max sequence length, precision (bf16 autocast on CUDA,
fp32 on CPU), attention (SDPA) and DataLoader (the project's tokenising workers: 2 on CUDA, 0 on
CPU, `--workers` for both; its prefetch factor and pinning). The result records each side's
workers and attention implementation, and the library versions.

Random weights of real shapes (speed does not depend on the weights), saved once as a
sentence-transformers folder (mean pooling, normalised, E5 `query: ` / `passage: ` prompts) that
both sides load. Tokenizer: the local models/e5-small one for the e5 shape when it is there, else a
BERT-style character tokenizer built in-process from the data. Data: CMRC 2018 questions -> their
paragraph, the hard negative the paragraph of the same article (the trial set has one per article:
then the other paragraph sharing most characters with the question), synthetic when absent.

The trainer runs first; the project then runs the very batches the trainer drew (recorded from its
batch sampler, which stays in the main process when workers collate), so the first-step losses
must agree (up to dropout masks and bf16). Examples/s is timed after `--warmup` steps.

    python -m bench.embed_finetune --shapes e5-small,bge-base-zh --method full,lora --name embed_finetune_gpu
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.common import table, write_result

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    "e5-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 1536,
                 "vocab_size": 250037},
    "bge-base-zh": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                    "vocab_size": 21128},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "vocab_size": 4000},
}
CMRC = ROOT.parent / "shared" / "data" / "cmrc2018" / "cmrc2018_trial.json"
PROMPTS = {"query": "query: ", "passage": "passage: "}
LORA = SimpleNamespace(lora=SimpleNamespace(r=16, alpha=32, dropout=0.05))


def cmrc_triples(path: Path, n: int, seed: int) -> list[dict]:
    """Question -> its paragraph; negative: another paragraph of its article, else the other
    paragraph sharing most characters with the question; cycled (next-best negative) up to `n`."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paras = [(a["id"], p["context"]) for a in data for p in a["paragraphs"]]
    chars = [set(c) for _, c in paras]
    base = []
    for i, (art, ctx) in enumerate(paras):
        for qa in next(p for a in data for p in a["paragraphs"] if p["context"] == ctx)["qas"]:
            q = qa["question"]
            same = [j for j, (a, _) in enumerate(paras) if a == art and j != i]
            ranked = same + sorted((j for j in range(len(paras)) if j != i and j not in same),
                                   key=lambda j: -len(chars[j] & set(q)))
            base.append((q, ctx, [paras[j][1] for j in ranked[:8]]))
    random.Random(seed).shuffle(base)
    return [{"query": q, "pos": [ctx], "neg": [negs[(k // len(base)) % len(negs)]]}
            for k, (q, ctx, negs) in ((k, base[k % len(base)]) for k in range(n))]


def synthetic_triples(n: int, seed: int) -> list[dict]:
    """Chinese-character questions (8-30) and paragraphs (120-500), a paragraph per 4 questions."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    paras = ["".join(rng.choices(alphabet, k=rng.randint(120, 500))) for _ in range(max(256, n // 4))]
    out = []
    for k in range(n):
        i = k % len(paras)
        out.append({"query": "".join(rng.choices(alphabet, k=rng.randint(8, 30))) + f"{k}？", "pos": [paras[i]],
                    "neg": [paras[(i + 1 + rng.randrange(len(paras) - 1)) % len(paras)]]})
    return out


def char_tokenizer(texts: list[str], vocab_size: int):
    """A BERT-style tokenizer (Chinese characters one token each) with the data's characters."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    counts = Counter(c for t in texts for c in t.lower() if not c.isspace())
    room = vocab_size - len(special)
    chars = [c for c, _ in counts.most_common(room // 2)]
    vocab = {t: i for i, t in enumerate(special + chars + ["##" + c for c in chars][:room - len(chars)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=200))
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def pick_tokenizer(shape: str, texts: list[str]):
    """(tokenizer, where it came from): models/e5-small's for the e5 shape when present."""
    if shape == "e5-small":
        from kb.models import ModelNotFoundError, resolve_model

        try:
            folder = resolve_model("model:e5-small", "embedder", ROOT / "models")
        except ModelNotFoundError:
            folder = ROOT / "models" / "e5-small"
        if (folder / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder)), str(folder)
    return char_tokenizer(texts, SHAPES[shape]["vocab_size"]), "in-process character tokenizer"


def build_model(shape: str, tok, folder: Path, max_len: int, dropout: float, seed: int) -> Path:
    """Random BERT weights of `shape` with `tok`, saved as a sentence-transformers folder."""
    import torch
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    cfg = BertConfig(**SHAPES[shape], max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(str(folder / "hf"))
    tok.save_pretrained(str(folder / "hf"))
    mods = [Transformer(str(folder / "hf"), max_seq_length=max_len), Pooling(cfg.hidden_size, "mean"), Normalize()]
    SentenceTransformer(modules=mods, prompts=PROMPTS, device="cpu").save(str(folder / "st"))
    return folder / "st"


def add_lora(st, seed: int) -> None:
    """The project's LoRA (finetune.embed.lora_config) injected into the encoder, in place."""
    import torch
    from peft import get_peft_model

    from finetune.embed import lora_config

    torch.manual_seed(seed)
    get_peft_model(st[0].auto_model, lora_config(LORA, False))


class RecordedBatches:
    """The trainer's batch sampler, noting each index list it yields. The sampler runs in the main
    process even when DataLoader workers collate, so the record survives workers."""

    def __init__(self, sampler, drawn: list) -> None:
        self.sampler, self.drawn = sampler, drawn

    def __getattr__(self, name: str):
        if "sampler" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["sampler"], name)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for indices in self.sampler:
            self.drawn.append(list(indices))
            yield indices


def loader_settings(cuda: bool, workers: int | None) -> dict:
    """The project's DataLoader settings (finetune.embed.make_loader) for this device and `--workers`."""
    from finetune.embed import make_loader

    dl = make_loader([], None, cuda, workers)
    return {"workers": dl.num_workers, "prefetch_factor": dl.prefetch_factor, "pin_memory": dl.pin_memory}


def attn_implementation(st) -> str | None:
    """The attention implementation of the encoder's underlying transformers model."""
    return getattr(st[0].auto_model.config, "_attn_implementation", None)


def run_baseline(folder: Path, rows: list[dict], args, device: str, method: str) -> tuple[dict, list[list[dict]]]:
    """SentenceTransformerTrainer with its defaults but for the shared settings (SDPA attention and
    the project's DataLoader workers, prefetch and pinning among them); also the batches it drew
    (as rows, recorded from its batch sampler), for the project to run."""
    import datasets
    import torch
    from sentence_transformers import SentenceTransformerTrainer

    from finetune.embed import load_sentence_transformer
    from finetune.sft import step_mark

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.training_args import (
            BatchSamplers,
            SentenceTransformerTrainingArguments,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments

    cuda = device.startswith("cuda")
    st = load_sentence_transformer(folder, device)
    st.max_seq_length = args.max_seq_length
    if method == "lora":
        add_lora(st, args.seed)
    loading = loader_settings(cuda, args.workers)
    steps, drawn, used = [], [], {}

    class Loss(MultipleNegativesRankingLoss):
        def forward(self, features, labels):
            loss = super().forward(features, labels)
            steps.append((features[0]["input_ids"].shape[0], loss.detach()))
            return loss

    class Trainer(SentenceTransformerTrainer):
        def get_batch_sampler(self, *a, **kw):
            sampler = super().get_batch_sampler(*a, **kw)
            return None if sampler is None else RecordedBatches(sampler, drawn)

        def get_train_dataloader(self):
            dl = super().get_train_dataloader()
            used.update(workers=dl.num_workers, prefetch_factor=dl.prefetch_factor, pin_memory=dl.pin_memory)
            return dl

    ds = datasets.Dataset.from_dict({"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows],
                                     "negative": [r["neg"][0] for r in rows]})
    total = args.warmup + args.steps
    targs = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_embed_st_"), per_device_train_batch_size=args.batch_size,
        max_steps=total, learning_rate=args.lr, warmup_steps=int(0.1 * total), weight_decay=0.01, bf16=cuda,
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to=[], disable_tqdm=True,
        logging_steps=10**6, seed=args.seed, use_cpu=not cuda, dataloader_num_workers=loading["workers"],
        dataloader_prefetch_factor=loading["prefetch_factor"], dataloader_pin_memory=loading["pin_memory"],
        prompts={"anchor": PROMPTS["query"], "positive": PROMPTS["passage"], "negative": PROMPTS["passage"]})
    # times from the end of the warm-up to the end of the last step (not the trainer's teardown)
    mark = step_mark(args.warmup, lambda: sum(n for n, _ in steps), cuda, last=total)
    trainer = Trainer(model=st, args=targs, train_dataset=ds, loss=Loss(st), callbacks=[mark])
    mark.t = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = (mark.end or time.perf_counter()) - mark.t
    out = {"examples_per_s": (sum(n for n, _ in steps) - mark.n) / seconds, "first_loss": steps[0][1].item(),
           "steps": len(steps), "examples_per_step": round(sum(n for n, _ in steps) / len(steps), 1),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
           "attn_implementation": attn_implementation(st), **used}
    del trainer, st
    if len(drawn) < len(steps):
        raise RuntimeError(f"recorded {len(drawn)} batches of the trainer's {len(steps)} steps")
    return out, [[rows[i] for i in batch] for batch in drawn[:len(steps)]]


def run_project(folder: Path, rows: list[dict], args, device: str, method: str,
                plan: list[list[dict]] | None) -> dict:
    """finetune.embed.train_embedder, loaded as `kb finetune embed` loads (SDPA attention)."""
    from finetune.embed import EmbedTrainOptions, load_sentence_transformer, train_embedder

    st = load_sentence_transformer(folder, device)
    st.max_seq_length = args.max_seq_length
    if method == "lora":
        add_lora(st, args.seed)
    opts = EmbedTrainOptions(batch_size=args.batch_size, learning_rate=args.lr, hard_negatives=1, seed=args.seed,
                             max_steps=args.warmup + args.steps, timing_from_step=args.warmup, progress=False,
                             plan=plan, workers=args.workers)
    res = train_embedder(st, rows, opts, device)
    attn = attn_implementation(st)
    del st
    return {"examples_per_s": res["pairs_per_s"], "tokens_per_s": res["tokens_per_s"], "first_loss": res["first_loss"],
            "steps": res["steps"], "examples_per_step": round(res["examples"] / max(1, res["steps"]), 1),
            "peak_mem_gib": res["peak_mem_gib"], "attn_implementation": attn,
            **loader_settings(device.startswith("cuda"), args.workers)}


def compare(shape: str, method: str, folder: Path, rows: list[dict], args, device: str) -> dict:
    """Both sides on one shape and method (the trainer first: the project reruns its batches)."""
    import torch

    row: dict = {"shape": shape, "method": method}
    plan = None
    for side in [s for s in ("baseline", "project") if s in args.sides.split(",")]:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        if side == "baseline":
            out, plan = run_baseline(folder, rows, args, device, method)
        else:
            out = run_project(folder, rows, args, device, method, plan)
        out = {k: round(v, 6 if k == "first_loss" else 2) if isinstance(v, float) else v for k, v in out.items()}
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        row[side] = out
        print(shape, method, side, out, flush=True)
    if "project" in row and "baseline" in row:
        a, b = row["project"]["first_loss"], row["baseline"]["first_loss"]
        row["first_loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-12)
        row["speedup"] = round(row["project"]["examples_per_s"] / row["baseline"]["examples_per_s"], 2)
        if row["baseline"]["peak_mem_gib"]:
            row["memory_ratio"] = round(row["project"]["peak_mem_gib"] / row["baseline"]["peak_mem_gib"], 2)
    return row


def versions() -> dict:
    """Versions of the libraries both sides run on."""
    import sentence_transformers
    import torch
    import transformers

    return {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="e5-small,bge-base-zh", help=f"of {sorted(SHAPES)}")
    ap.add_argument("--method", default="full,lora")
    ap.add_argument("--n", type=int, default=0, help="triples (default: 3 x (warmup + steps) x batch size)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--dropout", type=float, default=0.1, help="the real models' 0.1; 0 makes the first losses equal")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers that tokenise, both sides (default: the project's, 2 on CUDA, 0 on CPU)")
    ap.add_argument("--sides", default="project,baseline")
    ap.add_argument("--data", default=str(CMRC), help="CMRC 2018 (SQuAD-format) JSON; synthetic when absent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="embed_finetune_gpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    n = args.n or 3 * (args.warmup + args.steps) * args.batch_size
    data = Path(args.data)
    rows = cmrc_triples(data, n, args.seed) if data.is_file() else synthetic_triples(n, args.seed)
    texts = [t for r in rows for t in (r["query"], r["pos"][0], r["neg"][0])]
    runs = []
    for shape in args.shapes.split(","):
        tok, tok_from = pick_tokenizer(shape, texts)
        with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
            folder = build_model(shape, tok, Path(tmp), args.max_seq_length, args.dropout, args.seed)
            for method in args.method.split(","):
                row = compare(shape, method, folder, rows, args, device)
                row.update(tokenizer=tok_from, precision="bf16 autocast" if device.startswith("cuda") else "fp32")
                runs.append(row)
    setting = {"examples": len(rows), "data": str(data) if data.is_file() else "synthetic",
               "batch_size": args.batch_size,
               "timed_steps": args.steps, "warmup_steps": args.warmup, "max_seq_length": args.max_seq_length,
               "dropout": args.dropout, "lora": vars(LORA.lora), "prompts": PROMPTS, "device": device,
               "workers": loader_settings(device.startswith("cuda"), args.workers)["workers"], **versions()}
    if args.name:
        path = write_result(args.name, {"setting": setting, "runs": runs}, data=(data,) if data.is_file() else ())
        cols = ["shape", "method", "project_examples_per_s", "baseline_examples_per_s", "speedup",
                "project_peak_mem_gib", "baseline_peak_mem_gib", "project_first_loss", "baseline_first_loss"]
        print(table([{"shape": r["shape"], "method": r["method"], "speedup": r.get("speedup"),
                      **{f"{s}_{k}": r.get(s, {}).get(k) for s in ("project", "baseline")
                         for k in ("examples_per_s", "peak_mem_gib", "first_loss")}} for r in runs], cols))
        print(f"-> {path}")
    return runs


if __name__ == "__main__":
    main()
