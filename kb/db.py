"""One SQL interface over SQLite and PostgreSQL: the document store speaks it to either.

The store's SQL is written once, in the dialect both engines share (`?` placeholders, `ON
CONFLICT` upserts, `RETURNING`); `PgConnection` gives a psycopg connection the few
`sqlite3.Connection` methods the store uses (`execute`, `executemany`, `with conn:` as one
transaction, `in_transaction`, rows read by index or column name). Connections to one PostgreSQL
come from one pool per process (`psycopg_pool`), in autocommit mode: a transaction is exactly a
`with conn:` block (or a `snapshot()`), never an implicit one left open.

`advisory_lock` serialises writers of one KB across hosts: a PostgreSQL session lock, released
by the server when its holder's connection dies (a killed process never leaves a KB locked).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kb.errors import NotFound, Unavailable
from kb.writelock import ReentrantLock, WriteLockTimeout

log = logging.getLogger(__name__)
PG_SCHEMES = ("postgresql://", "postgres://")


class StoreUnavailable(Unavailable, ConnectionError):
    """The shared store (PostgreSQL) cannot be reached, or did not answer in time (503: try again)."""

    code = "store_unavailable"
    public = "the document store (PostgreSQL) is unavailable; try again shortly"


class StoreGone(NotFound, LookupError):
    """The knowledge base's schema went away under a reader (another host deleted the KB)."""

    def __init__(self) -> None:
        super().__init__("the knowledge base was deleted")


class Row(tuple):
    """A result row read by position (`row[0]`) or by column (`row["doc_id"]`, `dict(row)`), as
    `sqlite3.Row`."""

    _names: tuple[str, ...] = ()

    def keys(self) -> tuple[str, ...]:
        return self._names

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._names.index(key))
            except ValueError:
                raise IndexError(f"no column {key!r}") from None
        return tuple.__getitem__(self, key)


def _row_factory(cursor: Any):
    names = tuple(d.name for d in cursor.description or ())
    cls = type("Row", (Row,), {"_names": names})
    return lambda values: cls(values)


def to_pg(sql: str) -> str:
    """`sql` with SQLite's `?` placeholders as psycopg's `%s` (a literal `%` doubled). The
    store's SQL holds no `?` inside string literals."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgCursor:
    """The part of `sqlite3.Cursor` the store reads."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def fetchone(self):
        return self._cur.fetchone() if self._cur.description else None

    def fetchall(self) -> list:
        return self._cur.fetchall() if self._cur.description else []

    def __iter__(self):
        return iter(self.fetchall())


def _bindable(params: Sequence) -> tuple:
    """`params` as PostgreSQL takes them: text without NUL characters (which its text type cannot
    hold and SQLite stores; parsed documents sometimes carry them)."""
    return tuple(p.replace("\x00", "") if isinstance(p, str) and "\x00" in p else p for p in params)


@contextlib.contextmanager
def _mapped_errors(kb: str | None = None) -> Iterator[None]:
    """psycopg's errors as the platform's: on a KB's connection (`kb`), a table or schema gone
    (another host deleted the KB meanwhile) is StoreGone; a lost connection or a statement
    timeout is StoreUnavailable."""
    import psycopg
    from psycopg import errors

    try:
        yield
    except (errors.UndefinedTable, errors.InvalidSchemaName) as e:
        if kb is None:
            raise
        raise StoreGone() from e
    except (psycopg.OperationalError, errors.QueryCanceled) as e:
        raise StoreUnavailable(str(e)) from e


class PgConnection:
    """A pooled psycopg connection that the store uses as it uses a `sqlite3.Connection`."""

    dialect = "postgresql"

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        try:
            self.raw = pool.getconn()
        except Exception as e:  # psycopg_pool.PoolTimeout, OperationalError
            raise StoreUnavailable(f"no connection from the pool: {e}") from e
        self._tx: list[Any] = []
        self.kb: str | None = None
        """The KB whose schema this connection reads (set by ingest.pgstore), None for the registry."""

    def execute(self, sql: str, params: Sequence = ()) -> PgCursor:
        with _mapped_errors(self.kb):
            return PgCursor(self.raw.execute(to_pg(sql), _bindable(params)))

    def executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        rows = [_bindable(r) for r in rows]
        if rows:
            with _mapped_errors(self.kb), self.raw.cursor() as cur:
                cur.executemany(to_pg(sql), rows)

    def executescript(self, script: str) -> None:
        for stmt in (s.strip() for s in script.split(";")):
            if stmt:
                self.execute(stmt)

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def rollback(self) -> None:
        with _mapped_errors(self.kb):
            self.raw.execute("ROLLBACK")

    def __enter__(self) -> PgConnection:
        tx = self.raw.transaction()
        with _mapped_errors(self.kb):
            tx.__enter__()
        self._tx.append(tx)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _mapped_errors(self.kb):
            self._tx.pop().__exit__(*exc)

    def close(self) -> None:
        if self.raw is not None:
            raw, self.raw = self.raw, None
            with contextlib.suppress(Exception):  # a broken connection: the pool drops it
                if raw.info.transaction_status != 0:  # not IDLE: give it back clean
                    raw.execute("ROLLBACK")
                raw.execute("RESET search_path")
            self._pool.putconn(raw)


_pools: dict[tuple, Any] = {}
_pools_lock = threading.Lock()


def pg_pool(url: str, password_env: str = "", size: int = 8, timeout_s: float = 30.0):
    """The process's connection pool to PostgreSQL at `url` (made on first use)."""
    key = (url, password_env, size, timeout_s, os.getpid())
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            from psycopg_pool import ConnectionPool

            kwargs: dict[str, Any] = {"autocommit": True, "row_factory": _row_factory,
                                      "connect_timeout": max(1, int(timeout_s)),
                                      "options": f"-c statement_timeout={int(timeout_s * 1000)}"}
            kwargs.update(connect_kwargs(password_env))
            url = pg_url(url)
            pool = ConnectionPool(url, min_size=1, max_size=size, kwargs=kwargs, timeout=timeout_s, open=False,
                                  name="kb-store", check=ConnectionPool.check_connection)
            try:
                pool.open(wait=True, timeout=timeout_s)
            except Exception as e:  # PoolTimeout: no connection in time
                pool.close()
                raise StoreUnavailable(f"cannot connect to PostgreSQL at {redact(url)}: {e}") from e
            _pools[key] = pool
        return pool


def connect_kwargs(password_env: str) -> dict[str, Any]:
    """The password from the variable `password_env` names (none when it is empty)."""
    if not password_env:
        return {}
    if password_env not in os.environ:
        raise StoreUnavailable(f"store.password_env names {password_env}, which is not set")
    return {"password": os.environ[password_env]}


def pg_url(url: str) -> str:
    """`url` with the scheme libpq takes (`postgres://` is an accepted spelling of `postgresql://`)."""
    return "postgresql://" + url.split("://", 1)[1]


def redact(url: str) -> str:
    """`url` without a password or query parameters (for messages and result files)."""
    url = url.split("?", 1)[0]
    scheme, _, rest = url.partition("://")
    if "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}"
    return url


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for `name`."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)


class _AdvisoryLock(ReentrantLock):
    """One advisory lock in this process: a thread lock (reentrant), then the server's lock, held
    on a connection of its own (outside the pool, which readers and the writer's own store use)
    for as long as the outermost holder holds it."""

    def __init__(self, url: str, password_env: str, timeout_s: float, key: int) -> None:
        super().__init__()
        self.url, self.password_env, self.timeout_s, self.key = url, password_env, timeout_s, key
        self.busy_error = LockTimeout

    @property
    def conn(self) -> Any:
        """The lock's connection while it is held, else None."""
        return self.handle

    def _connect(self):
        import psycopg

        try:
            return psycopg.connect(pg_url(self.url), autocommit=True,
                                   connect_timeout=max(1, int(self.timeout_s)), keepalives=1, keepalives_idle=10,
                                   **connect_kwargs(self.password_env))
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"the write lock's connection to {redact(self.url)}: {e}") from e

    def _take(self, deadline: float, timeout: float, describe: str = "the knowledge base") -> Any:
        conn = self._connect()
        try:
            with _mapped_errors():
                while not conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(f"{describe} is being written by another process or host; waited "
                                          f"{timeout:.0f} s for its write lock. Try again when that write has "
                                          "finished.")
                    time.sleep(0.05)
        except BaseException:
            conn.close()
            raise
        return conn

    def alive(self, conn: Any = None) -> bool:
        """Whether the lock's connection (so the lock) is still there: a connection the server or
        the network ended has let the lock go."""
        try:
            (conn if conn is not None else self.handle).execute("SELECT 1")
        except Exception:  # noqa: BLE001 (any failure: the session and its lock are gone)
            return False
        return True

    def _drop(self, handle: Any) -> bool:
        held = self.alive(handle)
        handle.close()  # the server ends the session and its lock with it
        return held


class LockTimeout(WriteLockTimeout):
    """Another writer held the advisory lock longer than the timeout."""


_locks: dict[tuple, _AdvisoryLock] = {}
_locks_lock = threading.Lock()


@contextmanager
def advisory_lock(url: str, password_env: str, timeout_s: float, name: str, timeout: float,
                  describe: str) -> Iterator[None]:
    """Hold PostgreSQL's advisory lock `name` in the database at `url` (any host, any process;
    reentrant in the thread that holds it) for the block, waiting at most `timeout` seconds
    (LockTimeout). The server releases it when the holder's connection dies."""
    lock = _lock_for(url, password_env, timeout_s, name)
    lock.acquire(timeout, f"{describe} is being written by another thread of this process; waited {timeout:.0f} s",
                 describe=describe)
    try:
        yield
    except BaseException:
        lock.release()
        raise
    if not lock.release():
        raise StoreUnavailable(f"the write lock of {describe} was lost during the write (its connection ended)")


def _lock_id(url: str, name: str) -> tuple:
    """Which lock object of this process stands for advisory lock `name` in the database at `url`."""
    return pg_url(url), lock_key(name), os.getpid()


def _lock_for(url: str, password_env: str, timeout_s: float, name: str) -> _AdvisoryLock:
    key = _lock_id(url, name)
    with _locks_lock:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = _AdvisoryLock(url, password_env, timeout_s, key[1])
        return lock


def check_lock(url: str, name: str) -> None:
    """StoreUnavailable when this thread holds advisory lock `name` but its connection ended (the
    lock with it): a writer checks before the steps that must not overlap another writer's."""
    lock = _locks.get(_lock_id(url, name))
    if lock is not None and lock.conn is not None and lock.depth > 0 and not lock.alive():
        raise StoreUnavailable(f"the write lock {name!r} was lost (its connection ended)")
