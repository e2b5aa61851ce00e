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


def config_option(parser: argparse.ArgumentParser, flag: str, key: str, help: str = "", **kw: Any) -> None:
    """A flag that is a shorthand for `--set KEY=VALUE`: what it is given lands in the typed
    settings through the same path (validated, above the file and the environment), and the
    command reads the settings, never the flag."""
    dest = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, dest=dest, default=None, help=f"{help} (sets {key})".strip(), **kw)
    keys = dict(parser.get_default("config_keys") or {})
    keys[dest] = key
    parser.set_defaults(config_keys=keys)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `args` set: each `--set KEY=VALUE` (the value read as YAML: numbers, true,
    null, lists) and each `config_option` flag given."""
    import yaml

    out: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE (e.g. --set retrieval.k=8), not {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--set {item}: the value is not YAML: {e}") from e
    for dest, key in (getattr(args, "config_keys", None) or {}).items():
        if getattr(args, dest, None) is not None:
            out[key] = getattr(args, dest)
    return out


def emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[dict], str]) -> None:
    """Print `payload` as one JSON document (--json) or as `human` renders it."""
    if args.json:
        json.dump(payload, sys.stdout, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    else:
        print(human(payload))


def open_kb(settings: Settings, name: str | None):
    """The knowledge base `name`; a usage error when it is missing or not given."""
    from retrieval.knowledge_base import KnowledgeBase, NoSuchKB

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
