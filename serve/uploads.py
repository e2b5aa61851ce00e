"""Uploaded documents: saved under the KB's folder (write, then rename) and ingested like files."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

from ingest.pipeline import FileItem, doc_id_for


class UploadTooLarge(ValueError):
    """The upload is larger than serve.max_upload_mb."""


class BadFileName(ValueError):
    """The upload's file name is empty or unusable."""


def safe_name(name: str | None) -> str:
    """The file name without any folder part, with control characters removed."""
    base = Path((name or "").replace("\\", "/")).name
    base = re.sub(r"[\x00-\x1f]", "", base).strip()
    if base in ("", ".", ".."):
        raise BadFileName(f"unusable file name {name!r}")
    return base[:200]


def uploads_dir(kb_dir: Path) -> Path:
    return Path(kb_dir) / "uploads"


def save_upload(kb_dir: Path, name: str | None, data: BinaryIO, max_bytes: int) -> FileItem:
    """Copy `data` to `<kb_dir>/uploads/<name>`, refusing more than `max_bytes`.

    The bytes go to a temporary file first and are renamed into place only when complete, so an
    aborted or oversize upload leaves the previous version (if any) untouched.
    """
    fname = safe_name(name)
    folder = uploads_dir(kb_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while block := data.read(1 << 20):
                size += len(block)
                if size > max_bytes:
                    raise UploadTooLarge(f"{fname}: larger than the {max_bytes / 2**20:.0f} MiB upload limit")
                out.write(block)
        dest = folder / fname
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return FileItem(dest, fname, doc_id_for(f"upload:{fname}"))


def remove_upload(kb_dir: Path, path: str) -> None:
    """Delete a stored upload when `path` is one (files ingested from elsewhere are left alone)."""
    p = Path(path)
    try:
        if p.resolve().parent == uploads_dir(kb_dir).resolve():
            p.unlink(missing_ok=True)
    except OSError:
        pass


