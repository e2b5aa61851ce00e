"""Fuzzed files in one batch beside good ones: each bad file gets a specific reason, the good files
are ingested, nothing hangs; and the sandbox's time, memory and crash limits, each on its own."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from bench.file_fuzz import KINDS, big_stored_docx, build_kind, many_page_pdf
from ingest.loaders import ParseError
from ingest.sandbox import Limits, SandboxWorker

BAD = {kind: words for kind, (_, words) in KINDS.items() if words is not None}


@pytest.mark.timeout(300)
def test_one_batch_of_bad_files_fails_each_clearly_and_ingests_the_good(settings, tmp_path):
    from retrieval.knowledge_base import KnowledgeBase

    settings.parse = settings.parse.model_copy(update={"timeout_s": 8.0, "max_memory_mb": 300.0,
                                                       "max_unzipped_mb": 40.0})
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "good.md").write_text("# Refunds\n\nCustomers can return a product within 30 days.\n")
    (folder / "good.txt").write_text("Orders above 50 euros ship for free. Express delivery takes a day.\n")
    rng = random.Random(0)  # bombs of 51 MiB, a one-line text of 100 kB
    made = {kind: build_kind(kind, folder, rng, 0.05 if "bomb" in kind else 0.005) for kind in KINDS}
    made["slow"] = many_page_pdf(folder / "slow.pdf", 3000)
    made["memory"] = big_stored_docx(folder / "memory.docx", 20)
    expect = {**BAD, "slow": ["parsing took longer than parse.timeout_s=8 s"],
              "memory": ["parsing needed more than parse.max_memory_mb=300 MiB"]}

    t0 = time.monotonic()
    out = KnowledgeBase(settings, "fuzz", create=True).add_paths([folder], progress=False)
    failed = {Path(f["path"]).resolve(): f["error"] for f in out["failed"]}
    for kind, words in expect.items():
        reason = failed.get(made[kind].resolve(), "")
        assert any(w in reason for w in words), f"{kind}: {reason!r} says none of {words}"
    assert len(failed) == len(expect)
    assert out["ingested"] == 2 + len(KINDS) - len(BAD)  # the good files, the PDF named .docx, the long line
    assert time.monotonic() - t0 < 240


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def allocate(mib: int) -> int:
    return len(bytearray(mib * 2**20))


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.timeout(180)
def test_the_worker_survives_timeouts_memory_and_crashes_with_reasons():
    with SandboxWorker(Limits(timeout_s=3, max_memory_mb=200)) as w:
        assert w.call(len, "abc") == 3
        with pytest.raises(ParseError, match=r"took longer than parse.timeout_s=3 s"):
            w.call(sleep, 60)
        assert w.call(allocate, 50) == 50 * 2**20
        with pytest.raises(ParseError, match=r"needed more than parse.max_memory_mb=200 MiB"):
            w.call(allocate, 1000)
        with pytest.raises(ParseError, match=r"the parser crashed \(signal 11, SIGSEGV\)"):
            w.call(segfault)
        assert w.call(len, "ok") == 2 and w.restarts == 2
