"""`kb`: the command line, a thin layer over the library (see DESIGN.md for the contract).

Exit codes: 0 success, 2 bad usage or bad input, 1 internal failure.

Each capability's subcommands, with their argparse definitions, live in cli/commands/; the helpers
they share (UsageError, usage_errors, emit, open_kb) in cli/common.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cli.commands import config, evaluation, faq, finetuning, index, ingest, kbs, models, serving
from cli.common import UsageError, overrides_from, usage_errors
from kb.errors import KBError
from kb.settings import ConfigError, apply_overrides, load_settings

__all__ = ["UsageError", "build_parser", "main", "usage_errors"]

log = logging.getLogger("kb")


def build_parser() -> argparse.ArgumentParser:
    """The `kb` command-line parser with all its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default configs/default.yaml)")
    common.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="set one setting (e.g. retrieval.k=8), above the file and the environment; repeatable")
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    compare = argparse.ArgumentParser(add_help=False)  # the evaluations that can compare two runs
    compare.add_argument("--report", help="write a self-contained HTML report (and a JSON beside it)")
    compare.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                         help="the same evaluation on two runs, side by side: each a saved result .json, "
                              "or a config .yaml to run now, optionally with @KB "
                              "(e.g. configs/baseline_fixed.yaml@cmrc_baseline)")
    compare.add_argument("--limit", type=int, help="only the first N questions")

    p = argparse.ArgumentParser(prog="kb", description="Enterprise knowledge base: ingest, search, ask.")
    sub = p.add_subparsers(dest="command", required=True)
    # in the order `kb --help` lists them
    ingest.register(sub, common)  # ingest, train-nsp
    serving.register(sub, common)  # search, ask, serve, ui
    index.register(sub, common)  # reindex, migrate
    evaluation.register(sub, common, compare)  # eval retrieval|open|ablate|segmentation|choice
    finetuning.register(sub, common)  # finetune data|llm|embed|rerank|merge
    models.register(sub, common)  # models list|install
    kbs.register(sub, common)  # kbs, chunks [edit], rm
    faq.register(sub, common)  # faq import|list|rm
    config.register(sub, common)  # config defaults
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
        if settings is not None and (overrides := overrides_from(args)):
            settings = apply_overrides(settings, overrides)
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
