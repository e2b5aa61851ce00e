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
    from ingest.pipeline import ingest, items_from_paths

    items, missing = items_from_paths(args.paths)
    report = ingest(items, args.kb, settings, progress=not args.quiet, failed=missing)
    out = report.to_json()
    _emit(args, out, lambda r: (
        f"{r['kb']}: {r['ingested']} ingested, {r['skipped']} unchanged, {len(r['failed'])} failed, "
        f"{r['chunks']} chunks, {r['key_infos']} key-info entries in {r['seconds']:.1f}s"
        + "".join(f"\n  failed: {f['path']}: {f['error']}" for f in r["failed"])))
    if report.files and not report.ingested and not report.skipped:
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


def cmd_kbs(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.store import DocStore

    kbs = []
    if settings.home.is_dir():
        for d in sorted(p for p in settings.home.iterdir() if (p / "store.sqlite").is_file()):
            with DocStore.for_kb(d) as store:
                c = store.counts()
            kbs.append({"name": d.name, "documents": c["documents"], "chunks": c["chunks"]})
    _emit(args, {"kbs": kbs}, lambda r: "\n".join(
        f"{k['name']}: {k['documents']} documents, {k['chunks']} chunks" for k in r["kbs"]) or "(no knowledge bases)")
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    import shutil

    from ingest.store import DocStore

    d = _require_kb(settings, args.kb)
    if args.doc:
        with DocStore.for_kb(d) as store:
            if not store.delete_document(args.doc):
                raise UsageError(f"no document {args.doc!r} in knowledge base {args.kb!r}")
        removed: Any = {"kb": args.kb, "doc_id": args.doc}
    else:
        shutil.rmtree(d)
        removed = {"kb": args.kb}
    _emit(args, {"removed": removed}, lambda r: f"removed {r['removed']}")
    return 0


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
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers", "jieba", "faiss", "unstructured"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
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

        if isinstance(e, ModelNotFoundError | BadKBName):
            print(f"kb: error: {e}", file=sys.stderr)
            return 2
        log.exception("internal error")
        print(f"kb: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
