"""The document store on PostgreSQL (`store.url: postgresql://…`), shared by every host.

Each KB is a schema of its own holding the same tables as a KB's SQLite file (ingest/store.py
writes the same SQL to both). The schema `kb_registry` says which KBs exist (`kbs`), holds the
database's random id (`meta`: what a shared index records as the owner of a KB's vectors) and
the ingest queue (serve/jobs.py). A KB is created and deleted in one transaction each (its
registry row and its schema together), so no host ever sees half a KB.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ingest.store import SCHEMA_VERSION, DocStore, new_store_id, schema_ddl
from kb.db import PgConnection, advisory_lock, check_lock, lock_key, pg_pool
from kb.settings import StoreConfig

REGISTRY = "kb_registry"
_REGISTRY_DDL = [
    f"CREATE SCHEMA IF NOT EXISTS {REGISTRY}",
    f"CREATE TABLE IF NOT EXISTS {REGISTRY}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {REGISTRY}.kbs (name TEXT PRIMARY KEY, schema_name TEXT NOT NULL UNIQUE, "
    "created_at DOUBLE PRECISION NOT NULL)",
]
_ready: set[tuple[int, str]] = set()


def set_up_once(pool: Any, part: str, statements: Sequence[tuple[str, tuple]]) -> None:
    """Run `statements` ((sql, params), idempotent: CREATE … IF NOT EXISTS) in one transaction,
    once per pool and `part` in this process, under a transaction lock that every process takes
    for this (CREATE … IF NOT EXISTS is not safe against a concurrent twin in PostgreSQL)."""
    if (id(pool), part) in _ready:
        return
    conn = PgConnection(pool)
    try:
        with conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (lock_key("kb-ddl"),))
            for sql, params in statements:
                conn.execute(sql, params)
    finally:
        conn.close()
    _ready.add((id(pool), part))


def pool_for(cfg: StoreConfig):
    """The process's connection pool to the shared store, with the registry set up once."""
    pool = pg_pool(cfg.url, cfg.password_env, cfg.pool_size, cfg.timeout_s)
    set_up_once(pool, "registry", [*((ddl, ()) for ddl in _REGISTRY_DDL),
                                   (f"INSERT INTO {REGISTRY}.meta VALUES ('data_id', ?) ON CONFLICT (key) DO NOTHING",
                                    (uuid.uuid4().hex,))])
    return pool


_REGISTRY_LOCK = 7_402_118_560_331
"""The transaction lock taken while a KB is created, copied in or dropped (its registry row and
schema together)."""


def schema_name(kb: str) -> str:
    """The schema of KB `kb`: a fixed-length name from its hash (KB names may hold `.` and `-`
    and reach 64 characters, beyond PostgreSQL's 63)."""
    return "kb_" + hashlib.sha256(kb.encode("utf-8")).hexdigest()[:24]


def open_shared(cfg: StoreConfig, kb: str, create: bool = True) -> DocStore:
    """The store of KB `kb` in the shared database; `create`: made first when it does not exist,
    else FileNotFoundError."""
    pool = pool_for(cfg)
    conn = PgConnection(pool)
    try:
        if not _exists(conn, kb):
            if not create:
                raise FileNotFoundError(f"no knowledge base {kb!r} in the shared store")
            _create(conn, kb)
        conn.execute(f'SET search_path TO "{schema_name(kb)}"')
        conn.kb = kb
    except BaseException:
        conn.close()
        raise
    return DocStore.over(conn, kb)


def _exists(conn: PgConnection, kb: str) -> bool:
    return conn.execute(f"SELECT 1 FROM {REGISTRY}.kbs WHERE name = ?", (kb,)).fetchone() is not None


def _create(conn: PgConnection, kb: str) -> None:
    """The KB's registry row, schema and tables, in one transaction."""
    with conn:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_REGISTRY_LOCK,))
        if not _exists(conn, kb):
            _make_schema(conn, kb)
            _register(conn, kb)


def _make_schema(conn: PgConnection, kb: str) -> None:
    """The KB's schema and tables, searched first for the rest of the caller's transaction."""
    schema = schema_name(kb)
    conn.execute(f'CREATE SCHEMA "{schema}"')
    conn.execute(f'SET LOCAL search_path TO "{schema}"')
    for ddl in schema_ddl("postgresql"):
        conn.execute(ddl)
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    conn.execute("INSERT INTO meta VALUES ('store_id', ?)", (new_store_id(),))


def _register(conn: PgConnection, kb: str) -> None:
    conn.execute(f"INSERT INTO {REGISTRY}.kbs VALUES (?, ?, ?)", (kb, schema_name(kb), time.time()))


def create_copy(cfg: StoreConfig, kb: str, source: DocStore) -> dict[str, int]:
    """Make KB `kb` as a copy of the store `source` in one transaction: no host ever sees it
    half-copied, and a kill leaves no KB. Rows per table; ValueError when `kb` exists."""
    conn = PgConnection(pool_for(cfg))
    try:
        with conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_REGISTRY_LOCK,))
            if _exists(conn, kb):
                raise ValueError(f"knowledge base {kb!r} already exists in the shared store")
            _make_schema(conn, kb)
            counts = DocStore.over(conn, kb).copy_from(source)
            _register(conn, kb)
        return counts
    finally:
        conn.close()


def created_at(cfg: StoreConfig, kb: str) -> float | None:
    """When KB `kb` was created (what tells a KB from a later one of the same name), None if none."""
    conn = PgConnection(pool_for(cfg))
    try:
        row = conn.execute(f"SELECT created_at FROM {REGISTRY}.kbs WHERE name = ?", (kb,)).fetchone()
        return None if row is None else float(row[0])
    finally:
        conn.close()


def exists(cfg: StoreConfig, kb: str) -> bool:
    """Whether the shared store has KB `kb`."""
    conn = PgConnection(pool_for(cfg))
    try:
        return _exists(conn, kb)
    finally:
        conn.close()


def kb_names(cfg: StoreConfig) -> list[str]:
    """The KBs of the shared store, by name."""
    conn = PgConnection(pool_for(cfg))
    try:
        return [r[0] for r in conn.execute(f"SELECT name FROM {REGISTRY}.kbs ORDER BY name")]
    finally:
        conn.close()


def drop(cfg: StoreConfig, kb: str) -> bool:
    """Delete KB `kb` (its registry row and schema) in one transaction; whether it existed."""
    conn = PgConnection(pool_for(cfg))
    try:
        with conn:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_REGISTRY_LOCK,))
            if not _exists(conn, kb):
                return False
            conn.execute(f"DELETE FROM {REGISTRY}.kbs WHERE name = ?", (kb,))
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema_name(kb)}" CASCADE')
        return True
    finally:
        conn.close()


def data_id(cfg: StoreConfig) -> str:
    """The shared store's random id (made with its registry): the owner a shared index records,
    the same on every host."""
    conn = PgConnection(pool_for(cfg))
    try:
        return conn.execute(f"SELECT value FROM {REGISTRY}.meta WHERE key = 'data_id'").fetchone()[0]
    finally:
        conn.close()


def check_write_lock(cfg: StoreConfig, kb: str) -> None:
    """StoreUnavailable when this thread's write lock of KB `kb` was lost (its connection ended)."""
    check_lock(cfg.url, f"kb-write:{kb}")


def kb_write_lock(cfg: StoreConfig, kb: str, timeout: float) -> Any:
    """The write lock of KB `kb` across every host and process (a context manager)."""
    return advisory_lock(cfg.url, cfg.password_env, cfg.timeout_s, f"kb-write:{kb}", timeout, f"knowledge base {kb!r}")
