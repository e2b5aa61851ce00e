"""`kb`: the command line, a thin layer over the library (see DESIGN.md for the contract).

Exit codes: 0 success, 2 bad usage or bad input, 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import kb  # noqa: F401  (sets the offline environment first)
from kb.settings import ConfigError, Settings, load_settings

log = logging.getLogger("kb")


class UsageError(Exception):
    """Bad usage or bad input: exit code 2."""


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[dict], str]) -> None:
    if args.json:
        json.dump(payload, sys.stdout, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    else:
        print(human(payload))


# commands --------------------------------------------------------------------------------------
def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_train_nsp(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.pipeline import train_kb_nsp

    _require_kb(settings, args.kb)
    try:
        meta = train_kb_nsp(settings, args.kb, progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from e
    _emit(args, meta, lambda m: f"NSP head -> {m['out']}: held-out accuracy {m['heldout_accuracy']:.3f} "
                                f"on {m['heldout_pairs']} of {m['pairs']} pairs")
    return 0


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    kb_ = _open_kb(settings, args.kb)
    if not args.query.strip():
        raise UsageError("empty query")
    hits = [h.to_json() for h in kb_.search(args.query, args.k)]
    _emit(args, {"hits": hits}, lambda r: "\n\n".join(
        f"[{i + 1}] {h['source']} ({h['level']}, score {h['score']:.4f})\n{h['text'][:400]}"
        for i, h in enumerate(r["hits"])) or "(no hits)")
    return 0


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from serve.chain import AnswerChain

    if not args.question.strip():
        raise UsageError("empty question")
    chain = AnswerChain(settings, _open_kb(settings, args.kb))
    out = chain.ask(args.question, stage=args.stage)
    _emit(args, out, lambda r: r["answer"] + ("" if not r["fallback"] else f"\n(fallback: {r['reason']})")
          + "".join(f"\n[{i + 1}] {h['source']}" for i, h in enumerate(r["sources"])))
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from serve.api import serve

    serve(settings, args.host, args.port)
    return 0


def cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    import subprocess
    from pathlib import Path

    try:
        import streamlit  # noqa: F401
    except ImportError as e:
        raise UsageError("the UI needs streamlit: pip install 'kb-platform[ui]'") from e
    app = Path(__file__).resolve().parent.parent / "ui" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if args.config:
        cmd += ["--", "--config", str(Path(args.config).resolve())]
    return subprocess.call(cmd)


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

    kb_ = _open_kb(settings, args.kb)
    shutil.rmtree(kb_.dir / "index", ignore_errors=True)
    info = kb_.sync(progress=not args.quiet)
    _emit(args, info, lambda r: f"{args.kb}: index generation {r['generation']}, {r['vectors']} vectors")
    return 0


def cmd_kbs(args: argparse.Namespace, settings: Settings) -> int:
    from retrieval.kb import list_kbs

    kbs = list_kbs(settings)
    _emit(args, {"kbs": kbs}, lambda r: "\n".join(
        f"{k['name']}: {k['documents']} documents, {k['chunks']} chunks" for k in r["kbs"]) or "(no knowledge bases)")
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    kb_ = _open_kb(settings, args.kb)
    if args.doc:
        if not kb_.remove_document(args.doc):
            raise UsageError(f"no document {args.doc!r} in knowledge base {args.kb!r}")
        removed: Any = {"kb": args.kb, "doc_id": args.doc}
    else:
        kb_.delete()
        removed = {"kb": args.kb}
    _emit(args, {"removed": removed}, lambda r: f"removed {r['removed']}")
    return 0


def cmd_eval_retrieval(args: argparse.Namespace, settings: Settings) -> int:
    from eval.data import load_questions
    from eval.retrieval import evaluate_retrieval, write_report

    kb_ = _open_kb(settings, args.kb)
    questions, problems = load_questions(args.file)
    for p in problems:
        log.warning("%s", p)
    if not questions:
        raise UsageError(f"no usable questions in {args.file}")
    result = evaluate_retrieval(kb_, questions, args.k, progress=not args.quiet)
    result["skipped_rows"] = problems
    if args.report:
        write_report(result, args.report)
    _emit(args, result, lambda r: (f"n={r['n']}  recall@1={r['recall@1']:.3f}  recall@{args.k}="
                                   f"{r[f'recall@{args.k}']:.3f}  mrr={r['mrr']:.3f}  ndcg@{args.k}="
                                   f"{r[f'ndcg@{args.k}']:.3f}"))
    return 0


def _open_kb(settings: Settings, name: str):
    from retrieval.kb import KnowledgeBase, NoSuchKB

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
def build_parser() -> argparse.ArgumentParser:
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

    ev = sub.add_parser("eval", help="evaluate retrieval, answers, a model")
    evsub = ev.add_subparsers(dest="eval_command", required=True)
    s = evsub.add_parser("retrieval", parents=[common], help="recall@k, MRR, nDCG@k on a question file")
    s.add_argument("file")
    s.add_argument("--kb", required=True)
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--report", help="write an HTML report (and a JSON beside it)")
    s.set_defaults(func=cmd_eval_retrieval)

    s = sub.add_parser("kbs", parents=[common], help="list knowledge bases")
    s.set_defaults(func=cmd_kbs)

    s = sub.add_parser("rm", parents=[common], help="delete a knowledge base or one document")
    s.add_argument("--kb", required=True)
    s.add_argument("--doc", help="document id (default: the whole knowledge base)")
    s.set_defaults(func=cmd_rm)
    return p


def main(argv: list[str] | None = None) -> int:
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
        settings = load_settings(args.config)
        return args.func(args, settings)
    except (UsageError, ConfigError) as e:
        print(f"kb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kb: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        from kb.models import ModelNotFoundError
        from kb.paths import BadKBName

        from retrieval.index import IndexMismatchError

        if isinstance(e, ModelNotFoundError | BadKBName | IndexMismatchError):
            print(f"kb: error: {e}", file=sys.stderr)
            return 2
        log.exception("internal error")
        print(f"kb: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
