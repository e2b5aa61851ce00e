"""`kb ingest` and `kb train-nsp`: files into a knowledge base, and the chunker's sentence head trained on it."""

from __future__ import annotations

import argparse

from cli.common import UsageError, emit
from kb.settings import Settings


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """`kb ingest PATHS --kb NAME`: parse, chunk and index files; 2 when every file failed."""
    from retrieval.knowledge_base import KnowledgeBase

    kb_ = KnowledgeBase(settings, args.kb, create=True)
    out = kb_.add_paths(args.paths, progress=not args.quiet)
    emit(args, out, lambda r: (
        f"{r['kb']}: {r['ingested']} ingested, {r['skipped']} unchanged, {len(r['failed'])} failed, "
        f"{r['chunks']} chunks, {r['key_infos']} key-info entries, index {r['index']['vectors']} vectors "
        f"in {r['seconds']:.1f}s" + "".join(f"\n  failed: {f['path']}: {f['error']}" for f in r["failed"])))
    if out["files"] and not out["ingested"] and not out["skipped"]:
        return 2
    return 0


def cmd_train_nsp(args: argparse.Namespace, settings: Settings) -> int:
    """`kb train-nsp --kb NAME`: train the chunker's next-sentence head on a knowledge base."""
    from ingest.pipeline import train_kb_nsp

    kb = _require_kb(settings, args.kb)
    try:
        with kb.writing():
            meta = train_kb_nsp(settings, args.kb, progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from e
    emit(args, meta, lambda m: f"NSP head -> {m['out']}: held-out accuracy {m['heldout_accuracy']:.3f} "
                               f"on {m['heldout_pairs']} of {m['pairs']} pairs")
    return 0


def _require_kb(settings: Settings, name: str):
    """The knowledge base `name`; UsageError when there is none."""
    from retrieval.knowledge_base import KnowledgeBase, NoSuchKB

    try:
        return KnowledgeBase(settings, name)
    except NoSuchKB as e:
        raise UsageError(f"{e} (run `kb ingest PATH --kb {name}`)") from e


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ingest subcommands to `sub`, each with the shared options of `common`."""
    s = sub.add_parser("ingest", parents=[common], help="parse, chunk, extract key info and index files")
    s.add_argument("paths", nargs="+", help="files and folders")
    s.add_argument("--kb", required=True, help="knowledge base name")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("train-nsp", parents=[common], help="train the chunker's next-sentence head on a KB")
    s.add_argument("--kb", required=True)
    s.set_defaults(func=cmd_train_nsp)
