"""Uploaded documents: identified by their content, each stored in a folder of its own.

An upload's document id comes from the SHA-256 of its bytes, so two different files of the same
name are two documents, and an identical re-upload is the same document (the ingest skips it).
The file name is kept as the document's `source`. Each upload lives at
`<kb_dir>/uploads/<doc_id>/<name>`: written to a temporary file first, moved into its own folder
when complete, so an aborted, oversize or unreadable upload never touches another upload's file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ingest.pipeline import FileItem, doc_id_for
from kb.errors import InvalidRequest, KBError, NotFound


class UploadTooLarge(KBError, ValueError):
    """The upload is larger than serve.max_upload_mb."""

    status, code = 413, "payload_too_large"


class BadFileName(InvalidRequest, ValueError):
    """The upload's file name is empty or unusable."""


class BadUpload(InvalidRequest, ValueError):
    """The upload request cannot be carried out as asked (e.g. `replace` with several files)."""


class NoSuchDocument(NotFound, LookupError):
    """The document an upload should replace is not in the knowledge base."""


@dataclass(frozen=True)
class SavedUpload:
    """A stored upload: what to ingest, and whether this upload created its file (so that a failed
    ingest removes only what it added)."""

    item: FileItem
    new: bool


def safe_name(name: str | None) -> str:
    """The file name without any folder part, with control characters removed."""
    base = Path((name or "").replace("\\", "/")).name
    base = re.sub(r"[\x00-\x1f]", "", base).strip()
    if base in ("", ".", ".."):
        raise BadFileName(f"unusable file name {name!r}")
    return fit_bytes(base, 200)


def fit_bytes(name: str, max_bytes: int) -> str:
    """`name` cut to at most `max_bytes` bytes of UTF-8 (file systems count bytes), the stem cut
    and the extension kept."""
    if len(name.encode("utf-8")) <= max_bytes:
        return name
    suffix = Path(name).suffix if len(Path(name).suffix.encode("utf-8")) <= 16 else ""
    room = max_bytes - len(suffix.encode("utf-8"))
    stem = name[: len(name) - len(suffix)].encode("utf-8")[:room].decode("utf-8", errors="ignore")
    return stem + suffix


def uploads_dir(kb_dir: Path) -> Path:
    """The folder under a knowledge base's folder that holds its uploads."""
    return Path(kb_dir) / "uploads"


def upload_doc_id(sha256: str) -> str:
    """The document id of an upload whose content has this SHA-256."""
    return doc_id_for(f"upload:sha256:{sha256}")


def copy_limited(data: BinaryIO, dest: Path, max_bytes: int, fname: str) -> str:
    """Copy `data` to the new file `dest`, refusing more than `max_bytes`; the content's SHA-256."""
    digest, size = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        while block := data.read(1 << 20):
            size += len(block)
            if size > max_bytes:
                raise UploadTooLarge(f"{fname}: larger than the {max_bytes / 2**20:g} MiB upload limit")
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def read_upload(name: str | None, data: BinaryIO, max_bytes: int) -> tuple[str, bytes]:
    """An upload's safe file name and bytes, refusing more than `max_bytes` (UploadTooLarge)."""
    fname = safe_name(name)
    body = data.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise UploadTooLarge(f"{fname}: larger than the {max_bytes / 2**20:g} MiB upload limit")
    return fname, body


def save_upload(kb_dir: Path, name: str | None, data: BinaryIO, max_bytes: int) -> SavedUpload:
    """Store `data` as `<kb_dir>/uploads/<doc_id>/<name>`, refusing more than `max_bytes`.

    When the same content is stored already (under any name) that file is reused and nothing is
    written: the ingest then skips it as unchanged.
    """
    fname = safe_name(name)
    folder = uploads_dir(kb_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    os.close(fd)
    try:
        doc_id = upload_doc_id(copy_limited(data, Path(tmp), max_bytes, fname))
        home = folder / doc_id
        existing = stored_file(home)
        if existing is not None:
            Path(tmp).unlink()
            return SavedUpload(FileItem(existing, existing.name, doc_id), new=False)
        home.mkdir(exist_ok=True)
        dest = home / fname
        try:
            os.replace(tmp, dest)
        except OSError:
            with contextlib.suppress(OSError):
                home.rmdir()  # only when empty: another upload of this content may be in it
            raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return SavedUpload(FileItem(dest, fname, doc_id), new=True)


def stored_file(home: Path) -> Path | None:
    """The file kept in an upload's folder, or None when the folder is missing or empty."""
    try:
        return next((p for p in sorted(home.iterdir()) if p.is_file() and not p.name.startswith(".")), None)
    except (FileNotFoundError, NotADirectoryError):
        return None


def remove_upload(kb_dir: Path, path: str) -> None:
    """Delete a stored upload (its folder) when `path` is one; files ingested from elsewhere are
    left alone. Uploads stored flat (`uploads/<name>`, before per-upload folders) are removed too."""
    root = uploads_dir(kb_dir).resolve()
    try:
        p = Path(path).resolve()
        if p.parent == root:
            p.unlink(missing_ok=True)
        elif p.parent.parent == root:
            shutil.rmtree(p.parent, ignore_errors=True)
    except OSError:
        pass
