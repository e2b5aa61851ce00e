"""The ingest queue in PostgreSQL (serve/jobs.py), for real: jobs are taken once, in order; a
lapsed lease gives a job to another worker; a job that keeps killing its worker ends failed;
only the worker holding a job records its outcome."""

from __future__ import annotations

import threading
import time

import pytest

from kb.settings import StoreConfig
from serve import jobs


@pytest.fixture()
def cfg(pg_db_url):
    return StoreConfig(url=pg_db_url)


def test_jobs_are_taken_once_each_in_order_by_many_workers(cfg):
    ids = [jobs.enqueue(cfg, "a", [(f"f{i}.md", f"text {i}".encode())]) for i in range(30)]
    taken: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (job := jobs.claim(cfg, name, 60, 3)) is not None:
            with lock:
                taken.append((name, job.job_id))
            jobs.finish(cfg, job.job_id, name, {"ok": True})

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for _, j in taken) == sorted(ids) and len(taken) == len(set(taken)) == 30
    assert len({w for w, _ in taken}) > 1
    st = jobs.status(cfg, ids[0])
    assert st["state"] == "done" and st["result"] == {"ok": True} and st["attempts"] == 1 and jobs.waiting(cfg) == 0


def test_a_lapsed_lease_gives_the_job_to_another_worker_and_only_its_holder_finishes_it(cfg):
    job_id = jobs.enqueue(cfg, "a", [("x.md", b"x"), ("y.md", b"y")], replace="old")
    first = jobs.claim(cfg, "w1", 0.3, 3)
    assert first.files == [("x.md", b"x"), ("y.md", b"y")] and first.replace == "old" and first.kb == "a"
    assert jobs.claim(cfg, "w2", 0.3, 3) is None  # held
    time.sleep(0.5)
    assert not jobs.renew(cfg, job_id, "w2", 1)
    second = jobs.claim(cfg, "w2", 30, 3)
    assert second.job_id == job_id and second.attempts == 2
    assert not jobs.renew(cfg, job_id, "w1", 30)  # w1 lost it
    jobs.finish(cfg, job_id, "w1", {"from": "w1"})  # not the holder: ignored
    assert jobs.status(cfg, job_id)["state"] == "running"
    jobs.finish(cfg, job_id, "w2", None, "no such document")
    st = jobs.status(cfg, job_id)
    assert (st["state"], st["error"], st["result"]) == ("failed", "no such document", None)


def test_a_job_that_keeps_killing_its_worker_ends_failed(cfg):
    job_id = jobs.enqueue(cfg, "a", [("boom.pdf", b"%PDF")])
    other = jobs.enqueue(cfg, "a", [("ok.md", b"fine")])
    for _ in range(2):
        assert jobs.claim(cfg, "w", 0.05, 2).job_id == job_id
        time.sleep(0.1)  # the worker died: its lease runs out
    nxt = jobs.claim(cfg, "w", 30, 2)  # the third take is refused: the next job comes instead
    assert nxt.job_id == other
    st = jobs.status(cfg, job_id)
    assert st["state"] == "failed" and "gave up after 2 attempts" in st["error"]
    with pytest.raises(jobs.NoSuchJob):
        jobs.status(cfg, "0" * 24)


def test_the_serve_settings_reach_the_worker(settings, monkeypatch):
    """serve.job_lease_s, job_attempts and worker_poll_s, as configured, are what the worker
    claims with and waits between polls."""
    from kb.settings import apply_overrides
    from serve import worker

    s = apply_overrides(settings, {"store.url": "postgresql://kb@nowhere/kb", "retrieval.backend": "milvus",
                                   "serve.job_lease_s": 77.0, "serve.job_attempts": 9, "serve.worker_poll_s": 0.25})
    seen = []
    monkeypatch.setattr("ingest.pgstore.pool_for", lambda cfg: None)
    monkeypatch.setattr(worker.jobs, "prune", lambda cfg: 0)
    monkeypatch.setattr(worker.jobs, "claim", lambda cfg, me, lease, attempts: seen.append((lease, attempts)))

    class Stop(threading.Event):
        def wait(self, timeout=None):
            seen.append(timeout)
            self.set()
            return True

    worker.run_worker(s, stop=Stop())
    assert seen == [(77.0, 9), 0.25]


def test_a_passing_failure_queues_the_job_again_with_its_files(cfg, pg_db_url):
    """A job given back for a passing reason is queued again after a pause that doubles, keeps
    its files, uses up none of its attempts, and fails only once serve.job_retry_s has passed."""
    import psycopg

    def due_now() -> None:  # the pause is over (as if its seconds had passed)
        with psycopg.connect(pg_db_url, autocommit=True) as c:
            c.execute("UPDATE kb_registry.jobs SET lease_until = 0")

    job_id = jobs.enqueue(cfg, "a", [("x.md", b"x")])
    assert jobs.claim(cfg, "w", 60, 1).attempts == 1
    assert jobs.release(cfg, job_id, "w", "the index is unavailable", 3600) == "queued"
    assert jobs.claim(cfg, "w", 60, 1) is None  # held back for its pause
    due_now()
    again = jobs.claim(cfg, "w", 60, 1)  # max_attempts 1: the passing failure did not use it up
    assert again.job_id == job_id and again.files == [("x.md", b"x")] and again.attempts == 1
    assert jobs.release(cfg, job_id, "w", "the index is unavailable", 3600) == "queued"
    with psycopg.connect(pg_db_url, autocommit=True) as c:
        pause = c.execute("SELECT lease_until - EXTRACT(EPOCH FROM clock_timestamp()) FROM kb_registry.jobs")
        assert 8 < pause.fetchone()[0] <= 10  # 5 s, then 10 s
    due_now()
    jobs.claim(cfg, "w", 60, 1)
    assert jobs.release(cfg, job_id, "w", "the index is unavailable", 0.001) == "failed"
    st = jobs.status(cfg, job_id)
    assert st["state"] == "failed" and "the index is unavailable" in st["error"] and st["result"] is None
    assert jobs.release(cfg, job_id, "w", "x", 3600) == "lost"
