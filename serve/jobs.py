"""The ingest queue of a shared store: uploads wait in PostgreSQL until a `kb worker` takes them.

An API replica stores the uploaded files with their job in one transaction and only then
acknowledges the upload: whatever happens to the replica afterwards, the job is there. Workers
claim the oldest waiting job with `FOR UPDATE SKIP LOCKED` (many workers never take the same
one) and hold a lease on it that a heartbeat renews; a job whose worker died (its lease ran out)
is taken again (up to `serve.job_attempts` times), and a job that failed for a passing reason
(PostgreSQL or Milvus away, the KB's write lock busy) is queued again after a growing pause,
for up to `serve.job_retry_s` after it was queued.
Times are the database server's, so hosts' clocks never disagree about a lease.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ingest.pgstore import REGISTRY, pool_for, set_up_once
from kb.db import PgConnection
from kb.errors import NotFound
from kb.settings import StoreConfig

JOB_STATES = ("queued", "running", "done", "failed")
_DDL = [
    f"CREATE TABLE IF NOT EXISTS {REGISTRY}.jobs (job_id TEXT PRIMARY KEY, kb TEXT NOT NULL, "
    "state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')), replace_doc TEXT, "
    "created_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, "
    "lease_until DOUBLE PRECISION, worker TEXT, attempts INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL "
    "DEFAULT 0, result TEXT, error TEXT)",
    f"CREATE INDEX IF NOT EXISTS jobs_waiting ON {REGISTRY}.jobs (created_at) WHERE state IN ('queued', 'running')",
    f"CREATE TABLE IF NOT EXISTS {REGISTRY}.job_files (job_id TEXT NOT NULL REFERENCES {REGISTRY}.jobs "
    "ON DELETE CASCADE, ord INTEGER NOT NULL, name TEXT NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (job_id, ord))",
]
_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


class NoSuchJob(NotFound, LookupError):
    """No ingest job of that id."""


@dataclass(frozen=True)
class Job:
    """A claimed job: its KB, its files (name, bytes) and the document it replaces."""

    job_id: str
    kb: str
    files: list[tuple[str, bytes]]
    replace: str | None
    attempts: int


def _conn(cfg: StoreConfig) -> PgConnection:
    """A connection to the shared store, with the queue's tables set up once."""
    pool = pool_for(cfg)
    set_up_once(pool, "jobs", [(ddl, ()) for ddl in _DDL])
    return PgConnection(pool)


def enqueue(cfg: StoreConfig, kb: str, files: Iterable[tuple[str, bytes]], replace: str | None = None) -> str:
    """Queue the ingest of `files` into KB `kb` in one transaction (an error while `files` is read,
    e.g. a file over the limit, queues nothing); the job's id. One file is in memory at a time."""
    job_id = secrets.token_hex(12)
    conn = _conn(cfg)
    try:
        with conn:
            conn.execute(f"INSERT INTO {REGISTRY}.jobs (job_id, kb, state, replace_doc, created_at) "
                         f"VALUES (?, ?, 'queued', ?, {_NOW})", (job_id, kb, replace))
            for i, (name, data) in enumerate(files):
                conn.execute(f"INSERT INTO {REGISTRY}.job_files VALUES (?, ?, ?, ?)", (job_id, i, name, data))
    finally:
        conn.close()
    return job_id


KEEP_S = 7 * 86400
"""How long a finished job's record (state, result) is kept for GET /v1/jobs after it ended."""


def claim(cfg: StoreConfig, worker: str, lease_s: float, max_attempts: int) -> Job | None:
    """Take the oldest job waiting (queued and not held back, or whose worker's lease ran out), or
    None. Jobs whose worker died `max_attempts` times are marked failed first (committed apart)."""
    conn = _conn(cfg)
    try:
        with conn:
            gone = [r[0] for r in conn.execute(
                f"UPDATE {REGISTRY}.jobs SET state = 'failed', finished_at = {_NOW}, lease_until = NULL, error = ? "
                f"WHERE state = 'running' AND lease_until < {_NOW} AND attempts >= ? RETURNING job_id",
                (f"gave up after {max_attempts} attempts: the worker stopped each time (killed, out of memory, or "
                 "cut off from the database) while ingesting these files", max_attempts))]
            if gone:
                conn.execute(f"DELETE FROM {REGISTRY}.job_files WHERE job_id = ANY(?)", (gone,))
        with conn:
            row = conn.execute(
                f"UPDATE {REGISTRY}.jobs SET state = 'running', worker = ?, attempts = attempts + 1, "
                f"started_at = {_NOW}, lease_until = {_NOW} + ? WHERE job_id = (SELECT job_id FROM {REGISTRY}.jobs "
                f"WHERE (state = 'queued' AND (lease_until IS NULL OR lease_until < {_NOW})) OR (state = 'running' "
                f"AND lease_until < {_NOW} AND attempts < ?) ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1) "
                "RETURNING job_id, kb, replace_doc, attempts", (worker, lease_s, max_attempts)).fetchone()
            if row is None:
                return None
            files = [(r["name"], bytes(r["data"])) for r in conn.execute(
                f"SELECT name, data FROM {REGISTRY}.job_files WHERE job_id = ? ORDER BY ord", (row["job_id"],))]
        return Job(row["job_id"], row["kb"], files, row["replace_doc"], row["attempts"])
    finally:
        conn.close()


RETRY_MAX_S = 300.0
"""The longest pause before a job that failed for a passing reason is taken again."""


def release(cfg: StoreConfig, job_id: str, worker: str, error: str, retry_s: float) -> str:
    """Give back a job this worker could not finish for a passing reason (PostgreSQL, Milvus or the
    KB's write lock unavailable): queued again with its files after a pause that doubles each time
    (5 s up to RETRY_MAX_S), without using up one of its attempts (those count workers that died),
    or failed with `error` once `retry_s` seconds have passed since it was queued. The job's state
    after ("queued", "failed", or "lost" when this worker no longer held it)."""
    conn = _conn(cfg)
    try:
        with conn:
            row = conn.execute(f"SELECT retries, {_NOW} - created_at FROM {REGISTRY}.jobs WHERE job_id = ? AND "
                               "worker = ? AND state = 'running' FOR UPDATE", (job_id, worker)).fetchone()
            if row is None:
                return "lost"
            if row[1] >= retry_s:
                _end(conn, job_id, "failed", None, f"gave up after {retry_s:g} s of trying: {error}")
                return "failed"
            pause = min(RETRY_MAX_S, 5.0 * 2 ** row[0])
            conn.execute(f"UPDATE {REGISTRY}.jobs SET state = 'queued', worker = NULL, error = ?, "
                         f"retries = retries + 1, attempts = attempts - 1, lease_until = {_NOW} + ? WHERE job_id = ?",
                         (error, pause, job_id))
            return "queued"
    finally:
        conn.close()


def renew(cfg: StoreConfig, job_id: str, worker: str, lease_s: float) -> bool:
    """Extend the lease of a job this worker holds; False when it no longer holds it."""
    conn = _conn(cfg)
    try:
        return conn.execute(f"UPDATE {REGISTRY}.jobs SET lease_until = {_NOW} + ? WHERE job_id = ? AND worker = ? "
                            "AND state = 'running'", (lease_s, job_id, worker)).rowcount == 1
    finally:
        conn.close()


def finish(cfg: StoreConfig, job_id: str, worker: str, result: dict | None, error: str | None = None) -> None:
    """Record a job's outcome (done with `result`, or failed with `error`); its files are dropped."""
    conn = _conn(cfg)
    try:
        with conn:
            held = conn.execute(f"SELECT 1 FROM {REGISTRY}.jobs WHERE job_id = ? AND worker = ? AND state = 'running' "
                                "FOR UPDATE", (job_id, worker)).fetchone()
            if held is not None:
                _end(conn, job_id, "failed" if error else "done", result, error)
    finally:
        conn.close()


def _end(conn: PgConnection, job_id: str, state: str, result: dict | None, error: str | None) -> None:
    conn.execute(f"UPDATE {REGISTRY}.jobs SET state = ?, finished_at = {_NOW}, lease_until = NULL, result = ?, "
                 "error = ? WHERE job_id = ?",
                 (state, None if result is None else json.dumps(result, ensure_ascii=False), error, job_id))
    conn.execute(f"DELETE FROM {REGISTRY}.job_files WHERE job_id = ?", (job_id,))


def status(cfg: StoreConfig, job_id: str) -> dict[str, Any]:
    """A job's public state: job_id, kb, state, attempts, created/started/finished (epoch
    seconds), result (the `kb ingest` JSON when done) and error. NoSuchJob for an unknown id."""
    conn = _conn(cfg)
    try:
        row = conn.execute(f"SELECT job_id, kb, state, attempts, created_at, started_at, finished_at, result, error "
                           f"FROM {REGISTRY}.jobs WHERE job_id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    if row is None:
        raise NoSuchJob(f"no ingest job {job_id!r}")
    out = dict(row)
    out["result"] = None if out["result"] is None else json.loads(out["result"])
    return out


def prune(cfg: StoreConfig) -> int:
    """Remove the records of jobs that ended over KEEP_S ago; how many."""
    conn = _conn(cfg)
    try:
        return conn.execute(f"DELETE FROM {REGISTRY}.jobs WHERE state IN ('done', 'failed') AND finished_at < "
                            f"{_NOW} - ?", (KEEP_S,)).rowcount
    finally:
        conn.close()


def waiting(cfg: StoreConfig) -> int:
    """Jobs queued or running now."""
    conn = _conn(cfg)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {REGISTRY}.jobs WHERE state IN ('queued', 'running')").fetchone()[0]
    finally:
        conn.close()
