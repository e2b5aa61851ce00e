"""`kb finetune ...`: training data from a knowledge base; the LLM, the embedder and the reranker
fine-tuned; adapters merged."""

from __future__ import annotations

import argparse
import os

from cli.common import UsageError, config_option, emit, open_kb, read_questions, usage_errors
from kb.settings import Settings


def cmd_finetune_data(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune data --kb NAME --out FILE`: build SFT and embedder training data from a KB."""
    from finetune.data import build_training_data

    kb_ = open_kb(settings, args.kb)
    if args.questions:
        return _finetune_data_from_questions(args, settings, kb_)
    with usage_errors():
        out = build_training_data(settings, kb_, args.out, general=args.general, fmt=args.format,
                                  embed_out=args.embed_out, progress=not args.quiet)
    emit(args, out, lambda r: (f"{r['examples']} SFT examples -> {r['out']} ({r['domain']} domain, "
                               f"{r['refusals']} refusals, {r['identity']} identity, {r['general']} general; "
                               f"{r['generator']} questions)\n"
                               f"{r['embed_examples']} query/passage pairs -> {r['embed_out']} "
                               f"({r['with_hard_negatives']} with hard negatives)"))
    return 0


def _finetune_data_from_questions(args: argparse.Namespace, settings: Settings, kb_) -> int:
    from finetune.data import question_examples, write_sft

    questions, _ = read_questions(argparse.Namespace(file=args.questions, limit=args.limit))
    rows, counts = question_examples(settings, kb_, [(q.question, q.answers) for q in questions],
                                     progress=not args.quiet)
    out = {**write_sft(settings, rows, args.out, fmt=args.format, general=args.general), **counts,
           "questions": len(questions)}
    emit(args, out, lambda r: (f"{r['examples']} SFT examples -> {r['out']} from {r['questions']} questions "
                               f"({r['answered']} cited, {r['moved']} with the answer's passage moved into the "
                               f"top {settings.answer.k}, {r['refusals'] + r['extra_refusals']} refusals, "
                               f"{r['identity']} identity, {r['general']} general)"))
    return 0


def cmd_finetune_llm(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune llm`: fine-tune the LLM (full, LoRA, QLoRA or p-tuning); report on rank 0 only."""
    from finetune.sft import finetune_llm

    with usage_errors():
        out = finetune_llm(settings, args.data, args.out, adapter=args.adapter, resume=args.resume,
                           progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun/deepspeed: one report, from the main process
        return 0
    emit(args, out, lambda r: (f"{r['method']}: {r['steps']} steps, loss {_loss(r['train_loss'])}, "
                               f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak_mem_gib']:.2f} GiB -> {r['out']} "
                               f"(loss plot {r['loss_plot']})"))
    return 0


def cmd_finetune_embed(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune embed`: fine-tune the embedder on query/passage pairs."""
    from finetune.embed import finetune_embedder

    with usage_errors():
        out = finetune_embedder(settings, args.data, args.out, model=args.model, progress=not args.quiet,
                                max_steps=args.max_steps)
    emit(args, out, lambda r: (f"{r['steps']} steps, loss {r['train_loss']:.4f}, {r['pairs_per_s']:.0f} pairs/s, "
                               f"{r['added_tokens']} characters added -> {r['out']} (set models.embedder to it, "
                               "then `kb reindex`)"))
    return 0


def cmd_finetune_rerank(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune rerank`: train the cross-encoder reranker on query/pos/neg rows."""
    from finetune.rerank import finetune_reranker

    with usage_errors():
        out = finetune_reranker(settings, args.data, args.out, model=args.model, progress=not args.quiet,
                                max_steps=args.max_steps)
    emit(args, out, lambda r: (f"{r['steps']} steps on {r['train_groups']} queries, loss {r['first_loss']:.3f} -> "
                               f"{r['final_loss']:.3f}; held-out top-1 {r['heldout_before']['top1']} -> "
                               f"{r['heldout_after']['top1']} -> {r['out']} (set models.reranker to it)"))
    return 0


def cmd_finetune_merge(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune merge`: merge a LoRA adapter into its base model."""
    from finetune.sft import merge_adapter

    base = args.base or settings.models.llm
    if not base:
        raise UsageError("no base model: pass --base or set models.llm")
    with usage_errors():
        out = merge_adapter(base, args.adapter, args.out)
    emit(args, out, lambda r: f"merged {r['adapter']} into {r['base']} -> {r['out']}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the finetuning subcommands to `sub`, each with the shared options of `common`."""
    ft = sub.add_parser("finetune", help="build training data, fine-tune the LLM or the embedder, merge adapters")
    ftsub = ft.add_subparsers(dest="finetune_command", required=True)
    s = ftsub.add_parser("data", parents=[common], help="Q&A (SFT) and query/passage (embedder) data from a KB")
    s.add_argument("--kb", required=True)
    s.add_argument("--out", required=True, help="SFT JSONL; the embedder pairs go beside it (.embed.jsonl)")
    s.add_argument("--embed-out", help="where to write the query/pos/neg pairs")
    s.add_argument("--general", help="general instruction JSONL to mix in (finetune.general_ratio)")
    s.add_argument("--questions", help="real questions with gold answers (SQuAD JSON or JSONL): SFT examples "
                                       "in the answer chain's prompt, citing the passage that holds the answer")
    s.add_argument("--limit", type=int, help="with --questions: only the first N questions")
    s.add_argument("--format", choices=["messages", "prompt"], default="messages",
                   help='messages: {"messages": [...]}; prompt: {"prompt", "response", "history"}')
    s.set_defaults(func=cmd_finetune_data)

    s = ftsub.add_parser("llm", parents=[common], help="SFT of the LLM: LoRA, QLoRA, P-Tuning v2 or full")
    s.add_argument("--data", required=True, help="JSONL: messages, prompt/response/history or alpaca rows")
    s.add_argument("--out", required=True, help="adapter (or model) folder; checkpoints and loss.png inside")
    config_option(s, "--method", "finetune.method", choices=["lora", "qlora", "ptuning", "full"])
    config_option(s, "--model", "models.llm", help="base model")
    s.add_argument("--adapter", help="continue training this adapter")
    s.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    config_option(s, "--max-steps", "finetune.max_steps", type=int)
    config_option(s, "--epochs", "finetune.epochs", type=float)
    config_option(s, "--batch-size", "finetune.batch_size", type=int)
    config_option(s, "--grad-accum", "finetune.grad_accum", type=int)
    config_option(s, "--learning-rate", "finetune.learning_rate", type=float)
    config_option(s, "--max-length", "finetune.max_length", type=int)
    config_option(s, "--deepspeed", "finetune.deepspeed", help="DeepSpeed config, e.g. configs/deepspeed/zero3.json")
    config_option(s, "--no-packing", "finetune.packing", action="store_const", const=False)
    s.set_defaults(func=cmd_finetune_llm)

    s = ftsub.add_parser("embed", parents=[common], help="fine-tune the embedding model on query/pos/neg pairs")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--model", help="embedder to start from (default: models.embedder)")
    s.add_argument("--max-steps", type=int)
    s.set_defaults(func=cmd_finetune_embed)

    s = ftsub.add_parser("rerank", parents=[common],
                         help="train the cross-encoder reranker on query/pos/neg rows "
                              "(kb finetune data's .embed.jsonl)")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True, help="a CrossEncoder folder for models.reranker")
    s.add_argument("--model",
                   help="reranker (or encoder) to start from (default: models.reranker, else models.embedder)")
    s.add_argument("--max-steps", type=int)
    s.set_defaults(func=cmd_finetune_rerank)

    s = ftsub.add_parser("merge", parents=[common], help="fold a LoRA adapter into the base weights")
    s.add_argument("--adapter", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--base", help="base model (default: models.llm)")
    s.set_defaults(func=cmd_finetune_merge)


def _loss(x: float | None) -> str:
    """A training loss for the report line (None: it was NaN or infinite)."""
    return f"{x:.4f}" if x is not None else "not finite (NaN or inf)"
