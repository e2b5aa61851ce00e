"""What several `kb` commands share: the usage error (exit code 2), printing a result, opening a KB."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kb  # noqa: F401  (sets the offline environment first)
from kb.errors import KBError
from kb.settings import Settings

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


def emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[dict], str]) -> None:
    """Print `payload` as one JSON document (--json) or as `human` renders it."""
    if args.json:
        json.dump(payload, sys.stdout, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    else:
        print(human(payload))


def open_kb(settings: Settings, name: str | None):
    """The knowledge base `name`; a usage error when it is missing or not given."""
    from retrieval.kb import KnowledgeBase, NoSuchKB

    if not name:
        raise UsageError("--kb is required (with --compare, CONFIG.yaml@KB names one per run)")
    try:
        return KnowledgeBase(settings, name)
    except NoSuchKB as e:
        raise UsageError(f"{e} (run `kb ingest PATH --kb {name}`)") from e


def usable(items: list, problems: list[str], limit: int | None, source: str) -> list:
    """Warn about skipped rows, keep the first `limit` items; none left is bad input."""
    for p in problems:
        log.warning("%s", p)
    items = items[:limit] if limit else items
    if not items:
        raise UsageError(f"no usable questions in {source}")
    return items


def read_questions(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The usable questions of `args.file` (the first `args.limit`) and the rows skipped."""
    from eval.data import load_questions

    try:
        questions, problems = load_questions(args.file)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    return usable(questions, problems, args.limit, args.file), problems
