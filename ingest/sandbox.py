"""Run parsing in a child process with a time and a memory limit per call.

One worker process serves the calls of a batch (importing the parsers takes seconds, so it is not
started per file). A call that runs past its time limit gets the worker killed and a new one
started; a call that needs more memory than its limit fails inside the worker (RLIMIT_DATA, set
after the parsers are loaded, so the limit is what one file may take on top of them); a worker
that dies (segfault, abort, the kernel's OOM killer) is replaced. Each of these is a ParseError
with a reason that names the limit, and the next call goes on in a healthy worker.

Workers come from the `forkserver` start method with the parsers preloaded into the fork server,
so starting a replacement costs a fork, not a fresh import of unstructured.

SandboxPool runs several such workers, one call on each at a time, so that a batch is parsed
`parse.workers` files at once; every call keeps its own limits and fails alone.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import resource
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ingest.loaders import ParseError
from kb.procs import kill_group

log = logging.getLogger(__name__)

PRELOAD = ["kb", "ingest.loaders", "ingest.sandbox_warm"]
"""Modules the fork server imports once, so that every worker starts with the parsers loaded."""


@dataclass(frozen=True)
class Limits:
    """What one call may take: wall-clock seconds and MiB of memory beyond the loaded parsers."""

    timeout_s: float = 120.0
    max_memory_mb: float = 2048.0


def data_mib() -> float:
    """This process's data segment (what RLIMIT_DATA bounds) in MiB."""
    return _status_mib("VmData")


def _limit_memory(max_memory_mb: float) -> float:
    """Cap this process's data segment at its current size plus `max_memory_mb`; the cap in MiB."""
    cap = data_mib() + max_memory_mb
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = int(cap * 2**20)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return cap


def _lead_process_group() -> bool:
    """Make this worker the leader of its own process group, so that killing the group also ends
    the programs a parse runs (tesseract, soffice, pandoc); whether it is."""
    with suppress(OSError):
        os.setpgid(0, 0)
    return os.getpgrp() == os.getpid()


def kill_process_tree(proc: Any) -> None:
    """SIGKILL a running worker and, where it leads a process group, the programs it started."""
    if not proc.is_alive():
        return
    kill_group(proc.pid)
    proc.kill()


def _exit_with_parent(parent_pid: int, leader: bool) -> None:
    """Leave when the process that started us is gone (a killed `kb ingest` leaves no worker),
    taking our process group (what a parse started) along when we lead one."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except OSError:
                if leader:
                    os.killpg(0, signal.SIGKILL)
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _serve(conn: Connection, limits: Limits, parent_pid: int) -> None:
    """The worker: warm the parsers, cap memory, then answer (fn, args) calls until EOF."""
    _exit_with_parent(parent_pid, _lead_process_group())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which ends us
    import ingest.sandbox_warm as warm

    warm.warm_up()
    cap = _limit_memory(limits.max_memory_mb)
    conn.send(("ready", cap))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        status, value = _run(fn, args, limits)
        try:
            conn.send((status, value, data_mib()))
        except MemoryError:
            conn.send(("error", memory_reason(limits), data_mib()))


def _status_mib(key: str) -> float:
    """A size from /proc/self/status (VmData, VmRSS, VmHWM) in MiB; 0 where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak_rss() -> None:
    """Restart the VmHWM high-water mark at the current RSS (Linux >= 4.0; ignored elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _run(fn: Callable[..., Any], args: tuple, limits: Limits) -> tuple[str, Any]:
    """("ok", result) or ("error", reason) for one call; never raises. A parser that turns a
    failed allocation into its own error (lxml: "XMLSyntaxError: unknown error") is recognised
    by the call's peak RSS reaching most of the limit."""
    _reset_peak_rss()
    before = _status_mib("VmRSS")
    try:
        return "ok", fn(*args)
    except MemoryError:
        return "error", memory_reason(limits)
    except BaseException as e:  # noqa: BLE001 - whatever a parser raises is this file's failure
        if _status_mib("VmHWM") - before > 0.8 * limits.max_memory_mb:
            return "error", memory_reason(limits)
        if isinstance(e, ParseError):
            return "error", str(e)
        if isinstance(e, RecursionError):
            return "error", "the file is nested too deeply for the parser (RecursionError)"
        return "error", f"the parser failed: {type(e).__name__}: {str(e)[:200]}"


def memory_reason(limits: Limits) -> str:
    """The failure message for a parse that went over the memory limit."""
    return f"parsing needed more than parse.max_memory_mb={limits.max_memory_mb:g} MiB"


def timeout_reason(limits: Limits) -> str:
    """The failure message for a parse that went over the time limit."""
    return f"parsing took longer than parse.timeout_s={limits.timeout_s:g} s"


def crash_reason(exitcode: int | None, limits: Limits) -> str:
    """Why a worker that died mid-call died, from its exit code."""
    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        if sig == signal.SIGKILL:
            return (f"the parser was killed (signal 9, {name}): probably out of memory "
                    f"(parse.max_memory_mb={limits.max_memory_mb:g} MiB)")
        return f"the parser crashed (signal {sig}, {name})"
    return f"the parser process exited unexpectedly (exit code {exitcode})"


_STARTING = threading.Lock()


@contextmanager
def _main_hidden() -> Iterator[None]:
    """Start processes without the caller's `__main__`: multiprocessing would import the script
    that called us again in the worker (running an unguarded script's ingest a second time); the
    worker needs only this module."""
    with _STARTING:  # threads starting workers at once must not swap each other's __main__
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            if main is not None:
                sys.modules["__main__"] = main


class SandboxWorker:
    """A reusable worker process running picklable calls under `limits`, restarted as needed.

    Use as a context manager (or call close()); not for use from several threads at once."""

    def __init__(self, limits: Limits, start_timeout_s: float = 300.0) -> None:
        self.limits = limits
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._proc: Any = None
        self._conn: Connection | None = None
        self._cap_mib = 0.0

    def __enter__(self) -> SandboxWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, self.limits, os.getpid()), daemon=True,
                           name="kb-parse-worker")
        with _main_hidden():
            proc.start()
        child.close()
        self._proc = proc  # kill() can reach it while it warms up
        if not parent.poll(self.start_timeout_s):
            proc.kill()
            proc.join()
            self._proc = None
            raise RuntimeError(f"the parse worker did not start within {self.start_timeout_s:g} s")
        try:
            _, self._cap_mib = parent.recv()
        except (EOFError, OSError) as e:
            proc.join()
            self._proc = None
            raise RuntimeError(f"the parse worker failed to start (exit code {proc.exitcode})") from e
        self._conn = parent

    def _stop(self) -> None:
        """Kill the worker (if any) and reap it."""
        if self._proc is not None:
            kill_process_tree(self._proc)
            self._proc.join()
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def close(self) -> None:
        self._stop()

    def kill(self) -> None:
        """Kill the worker process now; safe from another thread: a call in progress there ends
        as a crash (its thread then reaps the process)."""
        proc = self._proc
        if proc is not None:
            kill_process_tree(proc)

    @property
    def pid(self) -> int | None:
        """The worker process's id while one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the worker; a ParseError with the reason when it fails, times out,
        runs out of memory or crashes the worker (which is then replaced on the next call)."""
        if self._proc is None or not self._proc.is_alive():
            self._stop()
            self._start()
        conn, proc = self._conn, self._proc
        assert conn is not None and proc is not None
        conn.send((fn, args))
        if not conn.poll(self.limits.timeout_s):
            self._restart_later()
            raise ParseError(timeout_reason(self.limits))
        try:
            status, value, used_mib = conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            reason = crash_reason(proc.exitcode, self.limits)
            self._restart_later()
            raise ParseError(reason) from None
        if used_mib > self._cap_mib - self.limits.max_memory_mb / 2:
            self._restart_later()  # it kept memory from earlier files: the next file gets a fresh one
        if status == "error":
            raise ParseError(value)
        return value

    def _restart_later(self) -> None:
        self.restarts += 1
        self._stop()


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


AUTO_MAX_WORKERS = 4
"""`parse.workers: 0` (auto) starts one worker per usable core, at most this many."""


def worker_count(configured: int) -> int:
    """How many parse workers `parse.workers` asks for: itself when positive, else (0, auto) one
    per usable CPU core, at most AUTO_MAX_WORKERS."""
    if configured < 0:
        raise ValueError(f"parse.workers must be 0 (auto) or a positive number, not {configured}")
    return configured or max(1, min(AUTO_MAX_WORKERS, usable_cpus()))


class SandboxPool:
    """`size` SandboxWorkers, each call run on an idle one: up to `size` calls at once, each under
    `limits` and each failing alone (timeout, memory, crash: the ParseError of SandboxWorker.call,
    that worker replaced). Workers start on first need, so a pool larger than its batch costs
    nothing. submit() returns a Future; close() (or leaving the `with` block, including by Ctrl-C)
    kills the workers, ends the calls in flight and reaps every process.

    Calls are driven by one thread per worker, which waits on the worker's pipe (no CPU, no GIL);
    the parsing itself runs in the worker processes."""

    def __init__(self, limits: Limits, size: int, start_timeout_s: float = 300.0) -> None:
        if size < 1:
            raise ValueError(f"a parse pool needs at least one worker, not {size}")
        self.limits = limits
        self.size = size
        self._workers = [SandboxWorker(limits, start_timeout_s) for _ in range(size)]
        self._idle: queue.LifoQueue[SandboxWorker] = queue.LifoQueue()
        for w in reversed(self._workers):  # LIFO: serial use keeps reusing one warm worker
            self._idle.put(w)
        self._closed = threading.Event()
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="kb-parse")

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def restarts(self) -> int:
        """Workers replaced so far (after a timeout, a crash, or memory kept from earlier files)."""
        return sum(w.restarts for w in self._workers)

    def pids(self) -> list[int]:
        """The worker processes running now."""
        return [pid for w in self._workers if (pid := w.pid) is not None]

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """A Future of fn(*args) run on the next idle worker (its exception: a ParseError as in
        SandboxWorker.call, or RuntimeError when a worker cannot start)."""
        if self._closed.is_set():
            raise RuntimeError("the parse pool is closed")
        return self._threads.submit(self._run, fn, args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on an idle worker, waited for."""
        return self.submit(fn, *args).result()

    def _run(self, fn: Callable[..., Any], args: tuple) -> Any:
        worker = self._idle.get()
        try:
            if self._closed.is_set():
                raise RuntimeError("the parse pool was closed")
            return worker.call(fn, *args)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Cancel the calls not started, kill the workers (ending the calls in flight) and reap
        them; returns once no worker process and no pool thread is left."""
        self._closed.set()
        self._threads.shutdown(wait=False, cancel_futures=True)
        while self._idle.qsize() < self.size:  # a call is in flight: kill until its thread lets go
            for w in self._workers:
                w.kill()
            time.sleep(0.02)
        for w in self._workers:
            w.close()
        self._threads.shutdown(wait=True)
