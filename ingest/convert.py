"""Formats read through an outside converter, and e-mail messages with their attachments.

- EPUB: Debian's `pandoc` turns it into HTML, read on the HTML path.
- Legacy binary Office files (DOC, XLS, PPT), OpenDocument (ODT, ODS, ODP) and RTF: LibreOffice
  headless converts them to DOCX/XLSX/PPTX, read on the usual path. (pandoc 2.17, Debian 12's,
  drops the header rows of ODT tables and reads GBK-encoded RTF, the usual Chinese RTF, as
  mojibake; LibreOffice reads both right.)
- EML and MSG (Outlook): the message body, then every attachment parsed by the caller's parser
  (recursively, to `MAX_ATTACHMENT_DEPTH`), each after a title block "Attachment: NAME".

Converters run as child processes in their own process group, with a timeout, and with the
parent-death signal set: when the parse worker is killed for its time limit, a stuck converter
dies with it. The worker's memory limit (RLIMIT_DATA) is lifted for the converter: LibreOffice
and pandoc (GHC's runtime) reserve address space up front and crash under any data limit, even
8 GiB; the time limit bounds them instead. Temporary folders carry the creating process's id;
those left by a killed process are removed by the next conversion.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import mimetypes
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ingest.loaders import ParseError, format_name
from ingest.types import Block
from kb.procs import kill_group

log = logging.getLogger(__name__)

PANDOC = {".epub": "epub"}
"""Extension -> pandoc input format."""
LIBREOFFICE = {".doc": ".docx", ".xls": ".xlsx", ".ppt": ".pptx", ".odt": ".docx", ".ods": ".xlsx",
               ".odp": ".pptx", ".rtf": ".docx"}
"""Extension -> the format LibreOffice converts it to."""
MESSAGES = {".eml", ".msg"}
LEGACY_OLE = {".doc", ".xls", ".ppt"}
DEBIAN_PACKAGE = {
    ".doc": "libreoffice-writer-nogui", ".xls": "libreoffice-calc-nogui",
    ".ppt": "libreoffice-impress-nogui", ".odt": "libreoffice-writer-nogui",
    ".ods": "libreoffice-calc-nogui", ".odp": "libreoffice-impress-nogui",
    ".rtf": "libreoffice-writer-nogui",
}
DEFAULT_TIMEOUT_S = 100.0
"""A converter still running after this is killed (below parse.timeout_s's default of 120 s, so
the file fails naming the converter; with isolate the worker's own limit also ends it)."""
MAX_ATTACHMENT_DEPTH = 3
"""A message attached to a message attached to a message: deeper attachments are noted, not read."""
MAX_ATTACHMENTS = 200
"""Attachments of one message read at most; the rest are noted."""

_OPENDOC_MIME = {
    "application/epub+zip": ".epub",
    "application/vnd.oasis.opendocument.text": ".odt",
    "application/vnd.oasis.opendocument.spreadsheet": ".ods",
    "application/vnd.oasis.opendocument.presentation": ".odp",
}
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("kb_attachment_depth", default=0)
_TMP_PREFIX = "kb-convert-"


# -- what a file is ------------------------------------------------------------------------------

def zip_document_type(path: Path, names: set[str]) -> str | None:
    """.epub/.odt/.ods/.odp for a zip whose `mimetype` member names one of them, else None."""
    if "mimetype" not in names:
        return None
    with zipfile.ZipFile(path) as zf, zf.open("mimetype") as fh:
        mime = fh.read(200).decode("ascii", errors="replace").strip()
    return _OPENDOC_MIME.get(mime)


def ole_type(path: Path) -> str | None:
    """.doc/.xls/.ppt/.msg for an OLE file by the streams it holds; None for an encrypted OOXML
    file or an OLE file of another kind. A damaged OLE file is a ParseError."""
    import olefile

    try:
        with olefile.OleFileIO(str(path)) as ole:
            streams = {"/".join(s) for s in ole.listdir(streams=True, storages=False)}
    except Exception as e:  # noqa: BLE001 - olefile raises anything on damaged input
        raise ParseError(f"damaged OLE file (old binary Office or Outlook format): "
                         f"{type(e).__name__}: {str(e)[:200]}") from e
    if {"EncryptionInfo", "EncryptedPackage"} & streams:
        return None
    if "WordDocument" in streams:
        return ".doc"
    if {"Workbook", "Book"} & streams:
        return ".xls"
    if "PowerPoint Document" in streams:
        return ".ppt"
    if "__properties_version1.0" in streams:
        return ".msg"
    return None


def is_encrypted(path: Path) -> bool:
    """Whether msoffcrypto finds a password on this Office file (False where it cannot tell)."""
    import msoffcrypto

    with open(path, "rb") as fh:
        try:
            return bool(msoffcrypto.OfficeFile(fh).is_encrypted())
        except Exception:  # noqa: BLE001 - an unknown layout is not a password
            return False


def missing_tool(ext: str) -> str:
    """The ParseError message for a format whose converter is not installed."""
    if ext in PANDOC:
        return f"reading {ext} needs pandoc (Debian package: pandoc)"
    target = format_name(LIBREOFFICE[ext])
    old = " (an old binary Office format)" if ext in LEGACY_OLE else ""
    return (f"reading {ext} needs LibreOffice (Debian: {DEBIAN_PACKAGE[ext]}); "
            f"or save it as {target} first{old}")


# -- running a converter -------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _child_setup(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when its parent dies (Linux), leaves at once if the
    parent is already gone, and runs without the parse worker's data-segment limit."""
    def setup() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup


def run_tool(cmd: list[str], timeout_s: float, what: str,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a converter in its own process group (environment `env`, default ours); the group is
    killed when it exceeds `timeout_s` (a ParseError naming `what`), when we are interrupted, and
    after it ends."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, env=env,
                            preexec_fn=_child_setup(os.getpid()))
    try:
        out, err = proc.communicate(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.communicate()
        raise ParseError(f"{what} took longer than {timeout_s:g} s converting the file") from None
    except BaseException:
        kill_group(proc.pid)
        proc.wait()
        raise
    kill_group(proc.pid)  # nothing it started outlives it
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale() -> None:
    """Remove temporary folders that processes killed mid-conversion left behind."""
    for d in Path(tempfile.gettempdir()).glob(_TMP_PREFIX + "*"):
        m = re.match(re.escape(_TMP_PREFIX) + r"(\d+)-", d.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def workdir() -> Iterator[Path]:
    """A private temporary folder, removed afterwards (or by a later sweep, if we are killed)."""
    _sweep_stale()
    d = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _tail(err: bytes) -> str:
    lines = [ln for ln in err.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no message"


def pandoc_html(path: Path, ext: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """An EPUB file as HTML, by pandoc (sandboxed: it reads nothing but the file)."""
    exe = shutil.which("pandoc")
    if exe is None:
        raise ParseError(missing_tool(ext))
    r = run_tool([exe, "--sandbox", "--from", PANDOC[ext], "--to", "html5", str(path)],
                 timeout_s, "pandoc")
    if r.returncode != 0:
        raise ParseError(f"pandoc could not read the {format_name(ext)} (corrupt or unreadable?): "
                         f"{_tail(r.stderr)}")
    return r.stdout.decode("utf-8", errors="replace")


def _soffice() -> str | None:
    """LibreOffice's soffice.bin (run directly: the soffice script's launcher would stand between
    us and the converter), or the soffice on PATH."""
    found = shutil.which("soffice") or shutil.which("libreoffice")
    if found is None:
        return None
    binary = Path(os.path.realpath(found)).with_name("soffice.bin")
    return str(binary) if binary.is_file() else found


@contextmanager
def office_converted(path: Path, ext: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Path]:
    """`path` (DOC/XLS/PPT/ODT/ODS/ODP/RTF) converted by LibreOffice to DOCX/XLSX/PPTX, in a private
    folder with its own LibreOffice profile (parallel conversions never share one), removed
    afterwards."""
    exe = _soffice()
    if exe is None:
        raise ParseError(missing_tool(ext))
    target = LIBREOFFICE[ext]
    deadline = time.monotonic() + timeout_s
    with workdir() as tmp:
        src = tmp / f"input{ext}"
        shutil.copyfile(path, src)
        cmd = [exe, "--headless", "--invisible", "--norestore", "--nolockcheck", "--nologo",
               "--nodefault", f"-env:UserInstallation={(tmp / 'profile').as_uri()}",
               "--convert-to", target[1:], "--outdir", str(tmp / "out"), str(src)]
        scratch = tmp / "tmp"  # its own lu*.tmp files, which a killed soffice leaves behind
        scratch.mkdir()
        env = {**os.environ, "TMPDIR": str(scratch)}
        for _ in range(2):  # on a fresh profile soffice.bin first exits 81 ("restart me")
            r = run_tool(cmd, deadline - time.monotonic(), "LibreOffice", env)
            if r.returncode != 81:
                break
        out = tmp / "out" / f"input{target}"
        if not out.is_file() or out.stat().st_size == 0:
            raise ParseError(f"LibreOffice could not convert the {format_name(ext)} (corrupt or "
                             f"unreadable?): exit code {r.returncode}, {_tail(r.stderr + r.stdout)}")
        yield out


# -- e-mail messages -----------------------------------------------------------------------------

def message_body(path: Path, ext: str) -> list[Any]:
    """The unstructured elements of a message's body, without its attachments."""
    if ext == ".msg":
        from unstructured.partition.msg import partition_msg

        return partition_msg(filename=str(path), process_attachments=False)
    from unstructured.partition.email import partition_email

    return partition_email(filename=str(path), process_attachments=False)


Attachment = tuple[str, bytes | None]
"""(file name, its bytes, or None where the message holds no data for it)."""


def _eml_attachments(part: Any, top: bool = True) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, bytes, content type) of a MIME part's attachments; an attached message whole."""
    ctype = part.get_content_type()
    if ctype == "message/rfc822" and not top:
        inner = part.get_payload()
        inner = inner[0] if isinstance(inner, list) and inner else None
        subject = str(inner.get("subject", "") or "") if inner is not None else ""
        yield (part.get_filename() or subject or "message",
               inner.as_bytes() if inner is not None else None, ctype)
    elif part.is_multipart():
        for sub in part.get_payload():
            yield from _eml_attachments(sub, top=False)
    elif not top and part.get_content_disposition() == "attachment":
        yield part.get_filename() or "", part.get_payload(decode=True), ctype


def message_attachments(path: Path, ext: str) -> list[Attachment]:
    """The attachments of an EML or MSG file, named with an extension where the name lacks one."""
    found: list[tuple[str, bytes | None, str]] = []
    if ext == ".msg":
        from oxmsg import Message

        for a in Message.load(str(path)).attachments:
            found.append((a.file_name or "", a.file_bytes, a.mime_type or ""))
    else:
        import email
        from email import policy

        with open(path, "rb") as fh:
            msg = email.message_from_binary_file(fh, policy=policy.default)
        found = list(_eml_attachments(msg))
    out: list[Attachment] = []
    for i, (name, data, ctype) in enumerate(found, 1):
        name = Path(name.replace("\\", "/")).name.replace("\0", "")
        if name in {"", ".", ".."}:
            name = f"attachment-{i}"
        if ctype == "message/rfc822" and not name.lower().endswith(".eml"):
            name += ".eml"  # named by its subject, which may hold dots
        elif not Path(name).suffix:
            name += mimetypes.guess_extension(ctype) or ""
        out.append((short_name(name), data))
    return out


def short_name(name: str, max_bytes: int = 200) -> str:
    """`name` cut to at most `max_bytes` UTF-8 bytes (file systems allow 255), its extension kept."""
    if len(name.encode()) <= max_bytes:
        return name
    stem, suffix = Path(name).stem, Path(name).suffix[:20]
    room = max_bytes - len(suffix.encode())
    return stem.encode()[:room].decode("utf-8", errors="ignore") + suffix


def attachment_blocks(path: Path, ext: str, parse: Callable[[Path], list[Block]]) -> list[Block]:
    """Blocks of every attachment of a message, each after a title "Attachment: NAME", parsed by
    `parse` (the caller's file parser, with its limits). An attachment that cannot be read is
    noted in a block and a warning; it never fails the message."""
    depth = _DEPTH.get()
    try:
        items = message_attachments(path, ext)
    except Exception as e:  # noqa: BLE001 - the body was read; a damaged attachment list is noted
        log.warning("%s: attachments not read: %s: %s", path.name, type(e).__name__, e)
        return [Block(f"(attachments not read: {type(e).__name__}: {str(e)[:200]})")]
    out: list[Block] = []
    if len(items) > MAX_ATTACHMENTS:
        log.warning("%s: %d attachments, only the first %d read", path.name, len(items), MAX_ATTACHMENTS)
        out.append(Block(f"({len(items) - MAX_ATTACHMENTS} attachments not read: more than "
                         f"{MAX_ATTACHMENTS} in one message)"))
    with workdir() as tmp:
        for i, (name, data) in enumerate(items[:MAX_ATTACHMENTS]):
            out.append(Block(f"Attachment: {name}", kind="title"))
            try:
                if depth >= MAX_ATTACHMENT_DEPTH:
                    raise ParseError(f"attachments nested more than {MAX_ATTACHMENT_DEPTH} deep")
                if not data:
                    raise ParseError("the message holds no data for it (a link or an embedded item)")
                out.extend(replace(b, depth=b.depth + 1) for b in _parse_detached(tmp, i, name, data, parse, depth))
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - one attachment never fails its message
                detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # no temp path
                reason = str(e) if isinstance(e, ParseError) else f"{type(e).__name__}: {detail[:200]}"
                log.warning("%s: attachment %r not read: %s", path.name, name, reason)
                out.append(Block(f"(attachment {name} not read: {reason})"))
    return out


def _parse_detached(tmp: Path, i: int, name: str, data: bytes,
                    parse: Callable[[Path], list[Block]], depth: int) -> list[Block]:
    """`data` written to a file named `name` and parsed one attachment level deeper."""
    folder = tmp / str(i)
    folder.mkdir()
    f = folder / name
    f.write_bytes(data)
    token = _DEPTH.set(depth + 1)
    try:
        return parse(f)
    finally:
        _DEPTH.reset(token)
        shutil.rmtree(folder, ignore_errors=True)
