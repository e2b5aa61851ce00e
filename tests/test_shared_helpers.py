"""The shared helpers of issue 17: atomic file and folder replacement, batched IN lists, the
step-timing callback."""

from __future__ import annotations

import os
import sqlite3
from types import SimpleNamespace

import pytest

from kb.fsutil import building_dir, replacing_file
from kb.jsonl import write_jsonl
from kb.sqlutil import in_batches


def test_replacing_file_replaces_whole_or_leaves_the_old(tmp_path):
    path = tmp_path / "CURRENT"
    path.write_text("old")
    with pytest.raises(RuntimeError), replacing_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT"]
    with replacing_file(path, mode=0o644) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("CURRENT.") and tmp.name.endswith(".tmp")
        tmp.write_text("new")
        assert path.read_text() == "old"
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT"]


def test_write_jsonl_is_readable_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    assert write_jsonl(out, [{"a": 1}, {"b": "二"}]) == 2
    assert out.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "二"}\n'
    assert out.stat().st_mode & 0o777 == 0o644 and [p.name for p in out.parent.iterdir()] == ["rows.jsonl"]


def test_building_dir_mode_and_failure(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), building_dir(dest, mode=0o755) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("crash")
    assert [p.name for p in dest.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]
    with building_dir(dest, mode=0o755) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and dest.stat().st_mode & 0o777 == 0o755
    with building_dir(tmp_path / "private") as tmp:
        pass
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("n", [0, 1, 899, 900, 901, 2500])
def test_in_batches_returns_every_row_once_past_the_variable_limit(n):
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (model TEXT, key INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(m, i) for m in ("a", "b") for i in range(6000)])
    keys = list(range(0, 2 * n, 2))
    rows = list(in_batches(conn, "SELECT key FROM t WHERE model=? AND key IN ({})", keys, ("b",)))
    assert sorted(k for (k,) in rows) == keys


def test_in_batches_cuts_at_size():
    seen = []

    class Conn:
        def execute(self, sql, args):
            seen.append((sql.count("?"), len(args)))
            return []

    list(in_batches(Conn(), "SELECT 1 WHERE x IN ({})", list(range(7)), size=3))
    assert seen == [(3, 3), (3, 3), (1, 1)]


def test_step_mark_notes_time_and_count_at_its_steps(monkeypatch):
    pytest.importorskip("transformers")
    import finetune.sft as sft

    clock = iter([10.0, 25.0])
    monkeypatch.setattr(sft.time, "perf_counter", lambda: next(clock))
    count = {"n": 0}
    mark = sft.step_mark(2, lambda: count["n"], cuda=False, last=4)
    for step in range(1, 5):
        count["n"] += 100
        mark.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert (mark.t, mark.n, mark.end, mark.n_end) == (10.0, 200, 25.0, 400)
    clock = iter([30.0, 31.0])
    uncounted = sft.step_mark(1, None, cuda=False, last=2)
    for step in (1, 2):
        uncounted.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert (uncounted.t, uncounted.end, uncounted.n, uncounted.n_end) == (30.0, 31.0, 0, 0)
    plain = sft.step_mark(9, lambda: 1, cuda=False)
    plain.on_step_end(None, SimpleNamespace(global_step=1), None)
    assert plain.t is None and plain.end is None and plain.n == 0


def test_timed_window_takes_the_marks_it_has_and_results_hold_no_nan():
    """tokens/s is taken between both step marks, from the first mark to the end when the last
    was not reached, else over the whole run; a NaN or infinite loss is reported as None."""
    import json
    import math

    from finetune.sft import finite, timed_window

    both = SimpleNamespace(t=10.0, n=200, end=25.0, n_end=500)
    first = SimpleNamespace(t=10.0, n=200, end=None, n_end=0)
    none = SimpleNamespace(t=None, n=0, end=None, n_end=0)
    assert timed_window(both, 900, 0.0, 40.0) == (300, 15.0)
    assert timed_window(first, 900, 0.0, 40.0) == (700, 30.0)
    assert timed_window(none, 900, 0.0, 40.0) == (900, 40.0) == timed_window(None, 900, 0.0, 40.0)
    assert finite(math.nan) is None and finite(math.inf) is None and finite(None) is None
    assert finite(1.234567, 4) == 1.2346 and finite(2) == 2.0
    json.loads(json.dumps({"loss": finite(math.nan)}, allow_nan=False))


def test_building_dir_sweeps_what_a_killed_build_left(tmp_path):
    """A hard kill skips the cleanup: the next build of the same folder removes the leftover, and
    leaves other folders' builds alone; modes follow the umask as mkdir would."""
    from kb.fsutil import umask_mode

    (tmp_path / ".model.building-abc").mkdir()
    (tmp_path / ".other.building-abc").mkdir()
    with building_dir(tmp_path / "model", mode=umask_mode(0o777)) as tmp:
        (tmp / "w").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.building-abc", "model"]
    mask = os.umask(0o077)
    try:
        assert umask_mode(0o666) == 0o600 and umask_mode(0o777) == 0o700
    finally:
        os.umask(mask)
