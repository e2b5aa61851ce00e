"""`kb kbs`, `kb chunks [edit]`, `kb rm`: the knowledge bases, their chunks, deleting."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli.common import UsageError, emit, open_kb
from kb.settings import Settings


def cmd_kbs(args: argparse.Namespace, settings: Settings) -> int:
    """`kb kbs`: list the knowledge bases with their document and chunk counts."""
    from retrieval.knowledge_base import list_kbs

    kbs = list_kbs(settings)
    emit(args, {"kbs": kbs}, lambda r: "\n".join(
        f"{k['name']}: {k['documents']} documents, {k['chunks']} chunks" for k in r["kbs"]) or "(no knowledge bases)")
    return 0


def cmd_chunks(args: argparse.Namespace, settings: Settings) -> int:
    """`kb chunks --kb NAME --doc ID` lists a document's chunks; `kb chunks edit ...` changes one."""
    if getattr(args, "chunks_command", None) == "edit":
        return cmd_chunks_edit(args, settings)
    from retrieval.knowledge_base import NoSuchChunk

    if not args.kb or not args.doc:
        raise UsageError("kb chunks needs --kb NAME and --doc ID (document ids: `kb chunks --kb NAME --doc ID` "
                         "after `kb search` or the API's GET /v1/kbs/{kb}/documents)")
    try:
        out = open_kb(settings, args.kb).chunks(args.doc)
    except NoSuchChunk as e:
        raise UsageError(str(e)) from e
    emit(args, out, lambda r: f"{r['source']} ({r['doc_id']}): {len(r['chunks'])} chunks" + "".join(
        f"\n[{c['ord']}]{' (edited by ' + c['edited']['user'] + ')' if c['edited'] else ''} "
        f"{'; '.join((c['key_info'] or {}).get('keywords', []))}\n    {c['text'][:300]}" for c in r["chunks"]))
    return 0


def cmd_chunks_edit(args: argparse.Namespace, settings: Settings) -> int:
    """`kb chunks edit`: replace a chunk's text (from --text or --file), recorded under the user's name."""
    import getpass

    from retrieval.knowledge_base import BadChunkText, NoSuchChunk

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
        out = open_kb(settings, args.kb).edit_chunk(args.doc, args.chunk, text, user)
    except (NoSuchChunk, BadChunkText) as e:
        raise UsageError(str(e)) from e
    emit(args, out, lambda r: f"{r['doc_id']} chunk {r['ord']}: " + (
        f"edited by {r['user']} at {r['at']} (edit {r['edit_id']})" if r["changed"] else "unchanged (same text)"))
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    """`kb rm --kb NAME [--doc ID]`: delete a document or a whole knowledge base."""
    from retrieval.knowledge_base import NoSuchKB

    kb_ = open_kb(settings, args.kb)
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
    emit(args, {"removed": removed}, lambda r: f"removed {r['removed']}")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the kbs subcommands to `sub`, each with the shared options of `common`."""
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
