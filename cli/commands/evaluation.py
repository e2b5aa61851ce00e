"""`kb eval ...`: retrieval, open-ended answers, ablation, segmentation, multiple choice."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.common import UsageError, emit, log, open_kb, read_questions, usable, usage_errors
from kb.settings import REPO_ROOT, Settings, load_settings


def cmd_eval_retrieval(args: argparse.Namespace, settings: Settings) -> int:
    """`kb eval retrieval FILE --kb NAME`: recall@k, MRR and nDCG@k on a question file."""
    from eval.retrieval import evaluate_retrieval, write_report

    questions, problems = read_questions(args)

    def run(s: Settings, kb_name: str) -> dict:
        result = evaluate_retrieval(open_kb(s, kb_name), questions, args.k, progress=not args.quiet)
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

    questions, problems = read_questions(args)

    def run(s: Settings, kb_name: str) -> dict:
        chain = AnswerChain(s, open_kb(s, kb_name))
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
    emit(args, result, markdown)
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
    emit(args, result, markdown)
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
    emit(args, result, lambda r: "\n".join(
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
    items = usable(items, problems, args.limit, args.path)

    def run(s: Settings, kb_name: str | None) -> dict:
        try:
            return run_choice(s, items, problems=problems, dev=dev, shots=args.shots, mode=args.mode,
                              kb=open_kb(s, kb_name) if kb_name else None, chat=args.chat,
                              progress=not args.quiet)
        except ValueError as e:
            raise UsageError(str(e)) from e

    return _run_eval(args, settings, run, write_report, lambda r: (
        f"accuracy={r['accuracy']:.4f} on n={r['n']} (chance {r['chance']:.2f}, {r['mode']}, {r['shots']}-shot"
        f"{', ' + str(r['unparsed']) + ' unparsed' if r['mode'] == 'generate' else ''})\n" + "\n".join(
            f"  {k}: {v['accuracy']:.4f} (n={v['n']})" for k, v in r["per_subject"].items())),
        "Multiple-choice evaluation")


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
        emit(args, result, human)
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
    emit(args, cmp, lambda c: "\n".join(head + [
        f"{m['metric']:<22}{m[la]:>12.4f}{m[lb]:>12.4f}{m['diff']:>+12.4f}" for m in c["metrics"]]))
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             compare: argparse.ArgumentParser) -> None:
    """Add the evaluation subcommands to `sub`, each with the shared options of `common` and `compare`."""
    ev = sub.add_parser("eval", help="evaluate retrieval, answers, a model")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
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
