"""File-system helpers shared by every floor: folders that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move `tmp` to `dest`, replacing an existing folder with at most a moment without one."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def building_dir(dest: Path, *, mode: int | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside `dest` that replaces `dest` when the block succeeds and
    is removed when it fails: a crash never leaves a half-written `dest`. The folder starts
    private (0700) unless `mode` is given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.building-*"):  # left by a killed build of the same folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dest)


def umask_mode(base: int) -> int:
    """`base` (0o666 for a file, 0o777 for a folder) less the process umask: what open() or
    mkdir() would have given, for temporary files and folders that start private."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def make_readable(folder: Path) -> None:
    """Folders 0755 and files 0644 under `folder`, like any installed file (a temporary folder
    from `building_dir` starts private)."""
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextmanager
def replacing_file(path: Path, *, mode: int | None = None) -> Iterator[Path]:
    """A fresh temporary file beside `path` (`<name>.<random>.tmp`, private (0600) unless `mode`
    is given) that, when the block succeeds, is fsynced and renamed over `path`, and is removed
    when it fails: readers see the old or the new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (`replacing_file`)."""
    with replacing_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
