"""Parallel parsing: `parse.workers` sandboxed worker processes parse a batch at once, the results
come back in the batch's order, each file keeps its own time/memory limits and fails alone, and no
worker outlives the pool or its parent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.file_fuzz import many_page_pdf
from ingest.loaders import ParseError
from ingest.pipeline import FileParser, ingest, items_from_paths
from ingest.sandbox import Limits, SandboxPool, usable_cpus, worker_count
from ingest.store import DocStore
from tests.conftest import DOCS, ROOT, SAMPLES, write_files

SAMPLE_FILES = ["docx-tables.docx", "empty.txt", "fake-memo.pdf", "password.pdf", "stanley-cups.xlsx",
                "umlauts-non-utf8.md"]


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def allocate(mib: int) -> int:
    return len(bytearray(mib * 2**20))


def start_program_and_hang(pid_file: str) -> None:
    """What a parse that runs an external program (tesseract, soffice) looks like when it hangs."""
    child = subprocess.Popen(["sleep", "120"])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(120)


def rendezvous(folder: str, name: str, n: int) -> int:
    """Mark `name` in `folder` and wait until `n` calls have: only calls running at once all
    return (each returns its process id); TimeoutError after 30 s."""
    Path(folder, name).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(folder)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {n} calls ran at once")
        time.sleep(0.02)
    return os.getpid()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no memory and runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], within_s: float) -> list[int]:
    """The processes of `pids` still alive after waiting up to `within_s` for them to end."""
    deadline = time.monotonic() + within_s
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def with_workers(settings, n: int, **parse):
    return settings.model_copy(update={"parse": settings.parse.model_copy(update={"workers": n, **parse})})


def batch(tmp_path: Path) -> list:
    folder = tmp_path / "batch"
    write_files(folder, DOCS)
    for name in SAMPLE_FILES:
        shutil.copy2(SAMPLES / name, folder / name)
    items, _ = items_from_paths([folder])
    return items


@pytest.mark.timeout(120)
def test_two_workers_give_the_same_documents_chunks_and_notifications_as_one(settings, tmp_path):
    settings.chunking = settings.chunking.model_copy(update={"method": "fixed"})
    items = batch(tmp_path)
    seen: dict[int, tuple] = {}
    for n in (1, 2):
        calls: list[tuple[str, str]] = []
        report = ingest(items, f"kb{n}", with_workers(settings, n), progress=False,
                        on_file=lambda src, st, calls=calls: calls.append((src, st)))
        with DocStore.for_kb(settings.kb_dir(f"kb{n}")) as store:
            docs = [(d.doc_id, d.source, d.title, d.content_hash, d.n_chunks) for d in store.documents()]
            chunks = [(c["doc_id"], c["chunk_id"], c["text"]) for c in store.chunks()]
        seen[n] = (calls, report.doc_ids, report.failed, docs, chunks)
    parsed = [src for src, st in seen[1][0] if st == "parsed"]
    assert parsed == [it.source for it in items if not it.source.endswith(("empty.txt", "password.pdf"))]
    assert len(seen[1][2]) == 2 and len(seen[1][3]) == len(parsed) and seen[1][4]
    for one, two in zip(seen[1], seen[2]):
        assert one == two


@pytest.mark.timeout(120)
def test_a_hanging_file_times_out_while_the_others_of_its_batch_are_parsed(settings, tmp_path):
    settings.chunking = settings.chunking.model_copy(update={"method": "fixed"})
    s = with_workers(settings, 2, timeout_s=3.0)
    folder = tmp_path / "batch"
    write_files(folder, DOCS)
    slow = many_page_pdf(folder / "m-slow.pdf", 3000)  # sorted among the good files
    items, _ = items_from_paths([folder])
    statuses: dict[str, str] = {}
    report = ingest(items, "hang", s, progress=False, on_file=lambda src, st: statuses.update({src: st}))
    assert report.failed == [{"path": str(slow), "error": "parsing took longer than parse.timeout_s=3 s"}]
    assert report.ingested == len(DOCS)
    assert statuses[f"batch/{slow.name}"] == "failed: parsing took longer than parse.timeout_s=3 s"
    assert {st for src, st in statuses.items() if not src.endswith(".pdf")} == {"ingested"}


@pytest.mark.timeout(90)
def test_a_crashing_or_memory_hungry_call_fails_alone_and_its_worker_is_replaced():
    with SandboxPool(Limits(timeout_s=30, max_memory_mb=200), 2) as pool:
        futures = [pool.submit(segfault), pool.submit(len, "abc"), pool.submit(allocate, 1000),
                   pool.submit(segfault), pool.submit(len, "ok")]
        with pytest.raises(ParseError, match=r"the parser crashed \(signal 11, SIGSEGV\)"):
            futures[0].result()
        assert futures[1].result() == 3
        with pytest.raises(ParseError, match=r"needed more than parse.max_memory_mb=200 MiB"):
            futures[2].result()
        with pytest.raises(ParseError, match=r"the parser crashed"):
            futures[3].result()
        assert futures[4].result() == 2
        assert pool.restarts >= 2  # both segfaulted workers; the memory one if it kept too much
        assert pool.call(allocate, 50) == 50 * 2**20


@pytest.mark.timeout(60)
def test_a_timed_out_call_takes_the_programs_it_started_along(tmp_path):
    pid_file = tmp_path / "child.pid"
    with SandboxPool(Limits(timeout_s=2, max_memory_mb=200), 1) as pool:
        with pytest.raises(ParseError, match=r"took longer than parse.timeout_s=2 s"):
            pool.call(start_program_and_hang, str(pid_file))
        child = int(pid_file.read_text())
        assert wait_gone([child], 5) == []
        assert pool.call(len, "ok") == 2


@pytest.mark.timeout(90)
def test_the_configured_number_of_workers_parse_at_once(settings, tmp_path, monkeypatch):
    with FileParser(with_workers(settings, 3)) as parse:
        assert parse.pool is not None and parse.pool.size == 3
        marks = tmp_path / "marks"
        marks.mkdir()
        futures = [parse.pool.submit(rendezvous, str(marks), str(i), 3) for i in range(3)]
        assert len({f.result() for f in futures}) == 3  # three processes, all running at once
    assert worker_count(0) == min(4, usable_cpus()) and worker_count(2) == 2
    with pytest.raises(ValueError):
        worker_count(-1)

    import ingest.pipeline as pipeline

    sizes: list[int] = []

    class Recording(SandboxPool):
        def __init__(self, limits: Limits, size: int) -> None:
            sizes.append(size)
            super().__init__(limits, size)

    monkeypatch.setattr(pipeline, "SandboxPool", Recording)
    report = ingest(write_files(tmp_path / "docs", DOCS), "conf", with_workers(settings, 3), progress=False)
    assert sizes == [3] and report.ingested == len(DOCS)


@pytest.mark.timeout(60)
def test_closing_the_pool_mid_call_kills_and_reaps_every_worker():
    pool = SandboxPool(Limits(timeout_s=60, max_memory_mb=200), 2)
    futures = [pool.submit(time.sleep, 60) for _ in range(4)]
    deadline = time.monotonic() + 30
    while len(pool.pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    assert futures[2].cancelled() and futures[3].cancelled()
    assert all(f.done() for f in futures)
    assert wait_gone(pids, 5) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(len, "x")


# The child takes Ctrl-C as a program started from a shell does: a test process that has run
# many others may pass on SIGINT blocked or ignored (libraries' helper threads and trackers
# change the mask and disposition), and Python then never raises KeyboardInterrupt.
CHILD = """
import signal, time
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)
from ingest.sandbox import Limits, SandboxPool
with SandboxPool(Limits(timeout_s=60, max_memory_mb=200), 2) as pool:
    futures = [pool.submit(time.sleep, 60) for _ in range(4)]
    while len(pool.pids()) < 2:
        time.sleep(0.05)
    print(*pool.pids(), flush=True)
    futures[0].result()
"""


@pytest.mark.timeout(120)
def test_ctrl_c_of_the_parent_mid_batch_leaves_no_worker():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(map(alive, pids))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) != 0
        assert wait_gone(pids, 10) == []
    finally:
        proc.kill()
        proc.wait()
