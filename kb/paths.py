"""Where state lives: `$KB_HOME/<kb>/` holds one knowledge base."""

from __future__ import annotations

import re
from pathlib import Path

_KB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KB_NAME_PATTERN = _KB_NAME.pattern
"""The regular expression of a valid KB name (the HTTP API's schema shows it)."""


class BadKBName(ValueError):
    """A knowledge-base name that cannot be a folder name."""


def check_kb_name(name: str) -> str:
    """Return `name` if it is a safe KB name (letters, digits, `_ . -`, at most 64)."""
    if not _KB_NAME.match(name or "") or name in {".", ".."}:
        raise BadKBName(
            f"invalid knowledge-base name {name!r}: use 1-64 letters, digits, '_', '.', '-'"
        )
    return name


def kb_dir(home: Path, kb: str) -> Path:
    """The folder of knowledge base `kb` under `home`; BadKBName for an invalid name."""
    return Path(home) / check_kb_name(kb)
