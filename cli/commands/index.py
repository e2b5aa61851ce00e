"""`kb reindex` and `kb migrate`: a knowledge base's vector index rebuilt, or moved to another backend."""

from __future__ import annotations

import argparse

from cli.common import UsageError, emit, open_kb
from kb.settings import Settings


def cmd_reindex(args: argparse.Namespace, settings: Settings) -> int:
    """`kb reindex --kb NAME`: rebuild the vector index and swap it in."""
    kb_ = open_kb(settings, args.kb)
    info = kb_.reindex(progress=not args.quiet)  # built beside the live index, then swapped in
    emit(args, info, lambda r: f"{args.kb}: index generation {r['generation']}, {r['vectors']} vectors")
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """`kb migrate --kb NAME --to CONFIG`: the KB under another configuration's backend, verified."""
    from kb.settings import load_settings_as_written
    from retrieval.migrate import MigrationMismatch, migrate_kb
    from retrieval.milvus import MilvusUnavailable, NotThisKB

    open_kb(settings, args.kb)
    try:
        info = migrate_kb(settings, load_settings_as_written(args.to), args.kb, args.queries, args.min_agreement,
                          progress=not args.quiet)
    except (ValueError, MigrationMismatch, MilvusUnavailable, NotThisKB) as e:
        raise UsageError(str(e)) from e
    emit(args, info, lambda r: f"{r['kb']}: {r['from']} -> {r['to']}, {r['vectors']['target']} vectors, "
                               f"same top 5 for {r['same_top5']:.1%} of {r['queries']} sampled queries")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the index subcommands to `sub`, each with the shared options of `common`."""
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
