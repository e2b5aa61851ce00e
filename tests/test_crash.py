"""Crash safety and concurrent writers: `kb ingest` / `kb rm` killed (SIGKILL) at every fault point
of the write path and at random moments, writers beside a serving API, the inter-process lock.

The killed commands are real `kb` processes; the checks and the recovery ingests run in-process
(the embedder is loaded once). bench/crash.py runs the long versions (20 random kills, 200 questions).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.crash import committed, concurrent, consistent, corpus, inspect, kb_cmd, kill_rounds, query_for, write_config
from kb import faults
from kb.settings import load_settings
from retrieval.index import IndexDir
from retrieval.knowledge_base import KnowledgeBase
from tests.conftest import ROOT, serving, write_files

BASE = corpus(4)
NEW = corpus(3, 10)
NEW_SOURCES = {f"new_docs/{n}" for n in NEW}  # ingested as a folder: cited relative to its parent


def _queries(sources: set[str], *texts: dict[str, str]) -> dict[str, str]:
    """source -> a search that must return it, for documents given as file name -> text."""
    by_name = {name: query_for(text) for files in texts for name, text in files.items()}
    return {src: by_name[Path(src).name] for src in sources}


@pytest.fixture()
def crash(settings, tmp_path):
    """(settings, config file) of the tiny configuration every process here uses: MiniLM (from
    the environment the `settings` fixture set), no LLM, the fixed-size chunker."""
    cfg = write_config(tmp_path)
    return load_settings(str(cfg)), cfg


def _base_kb(s, tmp_path: Path) -> KnowledgeBase:
    """A KB with two index generations (so that a publish also removes an old one)."""
    k = KnowledgeBase(s, "base", create=True)
    names = list(BASE)
    k.add_items(write_files(tmp_path / "base_docs", {n: BASE[n] for n in names[:3]}), progress=False)
    k.add_items(write_files(tmp_path / "base_docs", {names[3]: BASE[names[3]]}), progress=False)
    assert IndexDir(k.dir).current() == "gen-000002"
    return k


def _run_all(cmds: list[tuple[list[str], dict]], parallel: int = 2) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda c: subprocess.run(c[0], env=c[1], cwd=ROOT, capture_output=True, text=True,
                                                      timeout=600), cmds))


def _left_behind(idir: IndexDir, name: str) -> None:
    """What the kill at fault point `name` must have left (the point sits where it says)."""
    entries = {p.name for p in idir.root.iterdir()}
    cur = idir.current()
    if name.startswith("publish.") and name not in ("publish.after_replace", "publish.cleanup"):
        assert cur == "gen-000002", entries
    if name in ("publish.temp_partial", "publish.before_rename"):
        tmp = [e for e in entries if e.startswith(".tmp-gen-000003-")]
        assert len(tmp) == 1 and (idir.root / tmp[0] / "meta.json").exists() == (name == "publish.before_rename")
    if name == "publish.after_rename":
        assert "gen-000003" in entries  # today's publish was stuck for good on this folder
    if name == "publish.pointer_written":
        assert any(e.startswith("CURRENT.") and e.endswith(".tmp") for e in entries)
    if name == "publish.after_replace":
        assert cur == "gen-000003" and "gen-000001" in entries
    if name == "publish.cleanup":
        assert cur == "gen-000003" and "gen-000001" not in entries


def test_kill_at_every_fault_point_recovers(crash, tmp_path):
    s, cfg = crash
    base = _base_kb(s, tmp_path)
    write_files(tmp_path / "new_docs", NEW)
    removed = list(BASE)[0]
    doc_of = {d["source"]: d["doc_id"] for d in base.documents()}
    runs = []
    for i, point in enumerate(faults.POINTS):
        name = f"k{i}"
        shutil.copytree(base.dir, s.kb_dir(name))
        args = ("rm", "--kb", name, "--doc", doc_of[removed]) if point == "kb.after_delete" else \
            ("ingest", str(tmp_path / "new_docs"), "--kb", name)
        spec = f"{point}:2" if point == "store.after_commit" else point  # the 2nd of 3 documents
        runs.append((kb_cmd(cfg, *args), {**os.environ, "KB_FAULT": spec}))
    results = _run_all(runs)

    for i, (point, r) in enumerate(zip(faults.POINTS, results)):
        name = f"k{i}"
        assert r.returncode == -9, f"{point}: not killed there (rc {r.returncode})\n{r.stderr[-3000:]}"
        in_store = committed(s, name)
        if point == "store.after_commit":
            assert len(in_store & NEW_SOURCES) == 2
        if point == "kb.after_delete":
            assert removed not in in_store and IndexDir(s.kb_dir(name)).current() == "gen-000002"
        _left_behind(IndexDir(s.kb_dir(name)), point)
        # a reader of the half-written KB: no error, and hits from the whole generation CURRENT names
        reader = KnowledgeBase(s, name)
        hits = reader.search(query_for(BASE[list(BASE)[1]]), 5)
        assert list(BASE)[1] in [h.source for h in hits], point
        assert removed not in [h.source for h in reader.search(query_for(BASE[removed]), 5)] or removed in in_store

        # the next writer recovers by itself: a later ingest succeeds, and everything is there once
        later = corpus(1, 20 + i)
        k = KnowledgeBase(s, name)
        k.add_items(write_files(tmp_path / f"later{i}", later), progress=False)
        k.add_paths([tmp_path / "new_docs"], progress=False)
        expected = (set(BASE) | set(later) | NEW_SOURCES) - ({removed} if point == "kb.after_delete" else set())
        state = inspect(s, name, expected, _queries(expected, BASE, NEW, later))
        assert consistent(state, expected), (point, state)
        assert in_store <= expected


def test_a_generation_left_by_a_killed_publish_does_not_block_the_next(crash, tmp_path):
    """What today's code left when killed between its rename and CURRENT: the next publish must
    not fail on it (it failed on `Directory not empty` for good)."""
    s, _ = crash
    k = _base_kb(s, tmp_path)
    idir = IndexDir(k.dir)
    shutil.copytree(idir.root / "gen-000002", idir.root / "gen-000003")
    (idir.root / "gen-000004.tmp").mkdir()
    (idir.root / "CURRENT.tmp").write_text("gen-0000")
    k.add_items(write_files(tmp_path / "more", corpus(1, 30)), progress=False)
    # the leftovers were removed first, so the new generation took the number they had held
    assert sorted(p.name for p in idir.root.iterdir()) == ["CURRENT", "gen-000002", "gen-000003"]
    assert idir.current() == "gen-000003"
    expected = set(BASE) | set(corpus(1, 30))
    assert consistent(inspect(s, "base", expected, _queries(expected, BASE, corpus(1, 30))), expected)


def test_random_kills_lose_and_duplicate_nothing(crash, tmp_path):
    s, cfg = crash

    def recover(folder: Path) -> dict:
        return KnowledgeBase(s, "rand", create=True).add_paths([folder], progress=False)

    res = kill_rounds(s, cfg, Path(s.home), "rand", kills=3, per_round=3, seed=7, recover=recover)
    assert res["documents_lost"] == 0 and res["documents_duplicated"] == 0, res
    assert res["inconsistent_rounds"] == 0 and res["index_entries_missing"] == 0, res
    assert res["faults_injected"] == 3 and res["final_documents"] == 3 * (res["rounds_run"] + 1), res


def test_writers_beside_a_serving_api_never_empty_its_answers(crash, tmp_path, monkeypatch):
    from serve.api import create_app

    s, cfg = crash
    monkeypatch.setenv("KB_API_KEYS", '{"crash-key": ["live"]}')
    k = KnowledgeBase(s, "live", create=True)
    k.add_items(write_files(tmp_path / "live_docs", corpus(4, 40)), progress=False)
    with serving(create_app(s)) as base:
        res = concurrent(s, cfg, Path(s.home), "live", base, "crash-key", n_questions=30, rounds=1, per_round=3,
                         writers=2)
    assert res["writes_failed"] == 0, res["writes"]
    assert res["errors"] == 0 and res["empty_index_answers"] == 0, res
    assert res["questions"] >= 30 and res["questions_during_writes"] > 0
    assert res["final_consistent"], res["final_state"]


def test_the_write_lock_keeps_a_second_writer_out_and_names_the_kb(crash, tmp_path):
    from kb.writelock import WriteLockTimeout

    s, _ = crash
    k = KnowledgeBase(s, "locked", create=True)
    k.add_items(write_files(tmp_path / "d", corpus(2, 50)), progress=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kb.writelock import write_lock\n"
         f"with write_lock({str(k.dir)!r}, 5):\n    print('locked', flush=True); time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        s.retrieval.write_lock_timeout_s = 0.5
        busy = rf"'locked' is being written by another process \(pid {holder.pid}\)"
        with pytest.raises(WriteLockTimeout, match=busy):
            k.add_items(write_files(tmp_path / "d2", corpus(1, 60)), progress=False)
        with pytest.raises(WriteLockTimeout):
            k.remove_document(k.documents()[0]["doc_id"])
        assert len(k.search("Reference code", 3)) > 0  # readers take no lock
    finally:
        holder.kill()
        holder.wait()
    out = k.add_items(write_files(tmp_path / "d2", corpus(1, 60)), progress=False)
    assert out["ingested"] == 1 and len(k.documents()) == 3
