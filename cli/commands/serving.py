"""`kb search`, `kb ask`, `kb serve`, `kb ui`: answering from a knowledge base."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import UsageError, config_option, emit, open_kb
from kb.settings import Settings


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    """`kb search QUERY --kb NAME`: print the top-k retrieved passages."""
    kb_ = open_kb(settings, args.kb)
    if not args.query.strip():
        raise UsageError("empty query")
    hits = [h.to_json() for h in kb_.search(args.query, args.k)]
    emit(args, {"hits": hits}, lambda r: "\n\n".join(
        f"[{i + 1}] {h['source']} ({h['level']}, score {h['score']:.4f})\n{h['text'][:400]}"
        for i, h in enumerate(r["hits"])) or "(no hits)")
    return 0


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    """`kb ask QUESTION --kb NAME`: answer a question from the knowledge base, whole or streamed."""
    from serve.chain import AnswerChain

    if not args.question.strip():
        raise UsageError("empty question")
    chain = AnswerChain(settings, open_kb(settings, args.kb))
    sources = lambda r: "".join(f"\n[{i + 1}] {h['source']}" for i, h in enumerate(r["sources"]))  # noqa: E731
    if not args.stream or args.json:
        out = chain.ask(args.question, stage=args.stage).to_json()
        emit(args, out, lambda r: r["answer"] + ("" if not r["fallback"] else f"\n(fallback: {r['reason']})")
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

    if settings.store.shared:  # fail at the start when PostgreSQL cannot be reached at all
        from ingest.pgstore import pool_for

        pool_for(settings.store)
    serve(settings)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """`kb worker`: ingest uploads queued in the shared store until stopped (SIGTERM or Ctrl-C
    let the job in hand finish first); `--once`: until the queue is empty."""
    import logging
    import signal
    import threading

    from serve.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    n = run_worker(settings, once=args.once, stop=stop)
    emit(args, {"jobs": n}, lambda r: f"{r['jobs']} jobs run")
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
    app = Path(__file__).resolve().parents[2] / "ui" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if args.config:
        cmd += ["--", "--config", str(Path(args.config).resolve())]
    return subprocess.call(cmd)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the serving subcommands to `sub`, each with the shared options of `common`."""
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
    config_option(s, "--host", "serve.host")
    config_option(s, "--port", "serve.port", type=int)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("worker", parents=[common],
                       help="ingest the uploads queued in a shared store (store.url: postgresql://…)")
    s.add_argument("--once", action="store_true", help="stop when the queue is empty")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("ui", parents=[common], help="run the Streamlit app")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8501)
    s.set_defaults(func=cmd_ui)
