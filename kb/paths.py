"""Where state lives: `$KB_HOME/<kb>/` holds one knowledge base."""

from __future__ import annotations

import re
from pathlib import Path

from kb.errors import InvalidRequest

_KB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
KB_NAME_PATTERN = _KB_NAME.pattern
"""The regular expression of a valid KB name (the HTTP API's schema shows it)."""


class BadKBName(InvalidRequest, ValueError):
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


HOME_ID_FILE = ".home-id"
"""The file under a data folder holding its random id (KB names cannot start with a dot)."""


def home_id(home: Path) -> str:
    """The data folder's random id, made once (the first process to ask writes it, others read
    it): what identifies a data folder to a shared index, whatever path it is mounted at."""
    import os
    import uuid

    path = Path(home) / HOME_ID_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{HOME_ID_FILE}.{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise OSError(f"the data folder {home} has no id yet and cannot be written ({e}): run one write "
                          "(e.g. kb ingest) where it is writable") from e
        try:
            os.write(fd, uuid.uuid4().hex.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic; fails when another process made it first: theirs stands
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    value = path.read_text().strip()
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        raise ValueError(f"{path} does not hold a data-folder id ({value!r}): restore it from a backup, or remove "
                         "it and run `kb reindex` for each KB on a shared index")
    return value
