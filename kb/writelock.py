"""The write lock of one knowledge base: one writer at a time across processes and threads.

Every writer of a KB (ingest and its index sync, document removal, reindex, KB deletion) holds
`<kb_dir>/.write.lock` (an `fcntl.flock` on it) for the whole write; readers never take it. In one
process the lock is shared by every object that names the same folder and is reentrant in the
thread that holds it (a sync inside an ingest takes it again), so threads queue behind a
per-folder `threading.RLock` before the file lock is tried.

`fcntl` rather than the `filelock` package: a KB folder can be deleted (renamed away) while another
process waits for its lock, and the waiter must then notice that the file it locked is no longer
the KB's lock file (an inode check after locking) instead of writing into a deleted KB.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_NAME = ".write.lock"
_POLL_S = 0.05


class WriteLockTimeout(TimeoutError):
    """Another process (or thread) kept writing the knowledge base longer than the timeout."""


class ReentrantLock:
    """A lock one thread of one process holds at a time, across processes: a reentrant thread
    lock, then an outer lock (a file's, a database's) that the outermost holder takes (`_take`,
    which returns its handle) and lets go (`_drop`)."""

    busy_error: type[Exception] = WriteLockTimeout
    """What a wait for another thread of this process that outlasts the timeout raises."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.handle: Any = None

    def acquire(self, timeout: float, busy: str, **take: Any) -> None:
        """Take it within `timeout` seconds; WriteLockTimeout(`busy`) when another thread of this
        process holds it that long; `take` goes to `_take`."""
        deadline = time.monotonic() + timeout
        if not self.thread_lock.acquire(timeout=max(timeout, 0.0)):
            raise self.busy_error(busy)
        try:
            if self.depth == 0:
                self.handle = self._take(deadline, timeout, **take)
            self.depth += 1
        except BaseException:
            self.thread_lock.release()
            raise

    def release(self) -> bool:
        """Let go (the outermost holder lets the outer lock go); whether it was still held."""
        held = True
        try:
            self.depth -= 1
            if self.depth == 0 and self.handle is not None:
                handle, self.handle = self.handle, None
                held = self._drop(handle)
        finally:  # whatever letting the outer lock go raised, the thread lock is let go
            self.thread_lock.release()
        return held

    def _take(self, deadline: float, timeout: float, **take: Any) -> Any:
        raise NotImplementedError

    def _drop(self, handle: Any) -> bool:
        raise NotImplementedError


class _FolderLock(ReentrantLock):
    """The lock of one KB folder in this process: a thread lock, then the file lock."""

    def __init__(self, kb_dir: Path) -> None:
        super().__init__()
        self.kb_dir = kb_dir
        self.path = kb_dir / LOCK_NAME

    def _take(self, deadline: float, timeout: float, create: bool = True) -> int:
        return self._lock_file(deadline, timeout, create)

    def _drop(self, handle: int) -> bool:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
        return True

    def _lock_file(self, deadline: float, timeout: float, create: bool) -> int:
        """flock the lock file; retry on a fresh file when the one locked was deleted meanwhile."""
        while True:
            if not create and not self.kb_dir.is_dir():
                raise FileNotFoundError(f"no knowledge base folder {self.kb_dir}")
            self.kb_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while not _try_flock(fd):
                    if time.monotonic() >= deadline:
                        raise WriteLockTimeout(self._busy_message(timeout, _holder(fd)))
                    time.sleep(_POLL_S)
                if _same_file(fd, self.path):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, str(os.getpid()).encode(), 0)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the folder was deleted or replaced while we waited: lock the new one

    def _busy_message(self, timeout: float, holder: str) -> str:
        return (f"knowledge base {self.kb_dir.name!r} is being written by {holder}; waited {timeout:.0f} s "
                f"for its write lock ({self.path}). Try again when that write has finished.")


_registry: dict[Path, _FolderLock] = {}
_registry_lock = threading.Lock()


def _folder_lock(kb_dir: Path) -> _FolderLock:
    key = Path(os.path.abspath(kb_dir))
    with _registry_lock:
        lock = _registry.get(key)
        if lock is None:
            lock = _registry[key] = _FolderLock(key)
        return lock


@contextmanager
def write_lock(kb_dir: str | Path, timeout: float, create: bool = True) -> Iterator[None]:
    """Hold the write lock of the KB in `kb_dir` for the block, waiting at most `timeout` seconds
    (WriteLockTimeout names the KB and the holder). `create=False`: FileNotFoundError when the
    folder does not exist, instead of creating it."""
    lock = _folder_lock(Path(kb_dir))
    lock.acquire(timeout, lock._busy_message(timeout, "another thread of this process"), create=create)
    try:
        yield
    finally:
        lock.release()


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, from the pid its holder wrote into the file."""
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        pid = ""
    return f"another process (pid {pid})" if pid.isdigit() else "another process"
