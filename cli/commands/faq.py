"""`kb faq import|list|rm`: FAQ entries answered directly, without the LLM."""

from __future__ import annotations

import argparse

from cli.common import UsageError, emit, open_kb
from kb.settings import Settings


def cmd_faq_import(args: argparse.Namespace, settings: Settings) -> int:
    """`kb faq import FILE --kb NAME`: import FAQ rows; 2 when none was imported."""
    from retrieval.knowledge_base import KnowledgeBase
    from serve.faq import FaqFileError, import_faq

    try:
        out = import_faq(KnowledgeBase(settings, args.kb, create=True), args.file)
    except FaqFileError as e:
        raise UsageError(str(e)) from e
    emit(args, out, lambda r: (
        f"{r['kb']}: {r['imported']} of {r['rows']} FAQ rows imported ({r['added']} new, {r['updated']} changed, "
        f"{r['unchanged']} unchanged), {len(r['failed'])} failed; {r['entries']} entries in all"
        + "".join(f"\n  line {f['line']}: {f['error']}" for f in r["failed"])))
    return 2 if not out["imported"] else 0


def cmd_faq_list(args: argparse.Namespace, settings: Settings) -> int:
    """`kb faq list --kb NAME`: list the FAQ entries."""
    from serve.faq import list_faq

    entries = [e.to_json() for e in list_faq(open_kb(settings, args.kb))]
    emit(args, {"kb": args.kb, "faq": entries}, lambda r: "\n".join(
        f"{e['id']} [{e['stage'] or '*'}] {e['question']} -> {e['answer'][:80]}" for e in r["faq"])
        or "(no FAQ entries)")
    return 0


def cmd_faq_rm(args: argparse.Namespace, settings: Settings) -> int:
    """`kb faq rm --kb NAME --id ID | --all`: remove FAQ entries."""
    from serve.faq import list_faq, remove_faq

    if bool(args.id) == bool(args.all):
        raise UsageError("name the entries to remove with --id ID (repeatable) or --all")
    kb_ = open_kb(settings, args.kb)
    if args.id:
        missing = sorted(set(args.id) - {e.faq_id for e in list_faq(kb_)})
        if missing:
            raise UsageError(f"no FAQ entry {', '.join(missing)} in knowledge base {args.kb!r} (`kb faq list`)")
    n = remove_faq(kb_, None if args.all else args.id)
    emit(args, {"removed": {"kb": args.kb, "ids": "all" if args.all else args.id, "count": n}},
         lambda r: f"removed {r['removed']['count']} FAQ entries from {args.kb}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the faq subcommands to `sub`, each with the shared options of `common`."""
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
