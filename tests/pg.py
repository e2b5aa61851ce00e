"""A throwaway PostgreSQL server for the tests (store.url: postgresql://...): the fixtures
`postgres_url` (one server per test session, on a free loopback port) and `pg_db_url` (a fresh
database on it per test). They need Debian's `postgresql` package (scripts/system-packages.sh
installs it) and fail, not skip, without it: CI has it."""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_USER = "kb"
PG_DB = "kbtest"
_MISSING = ("PostgreSQL's server binaries (initdb, pg_ctl) were not found in /usr/lib/postgresql/*/bin "
            "nor on PATH: install Debian's `postgresql` package (apt-get install postgresql; "
            "scripts/system-packages.sh does)")


def pg_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl, else pg_ctl's folder on PATH."""

    def version(d: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(d).parent.name)) or (0,)

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(d) / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(d)
    found = shutil.which("pg_ctl")
    if found:
        d = Path(found).resolve().parent
        if (d / "initdb").exists():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traversable_by_all(path: str) -> bool:
    p = Path(path).resolve()
    return all(os.stat(a).st_mode & 0o001 for a in [p, *p.parents])


class _Server:
    """initdb + pg_ctl in a temporary folder; as root, as the `postgres` user (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            pytest.fail(_MISSING, pytrace=False)
        self.bin = bindir
        self.prefix: list[str] = []
        self.owner: pwd.struct_passwd | None = None
        base = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, and PostgreSQL will not run as root: it needs the `postgres` "
                            "user, which Debian's `postgresql` package creates", pytrace=False)
            if shutil.which("runuser"):
                self.prefix = ["runuser", "-u", "postgres", "--"]
            else:  # su: one shell command line
                self.prefix = ["su", "postgres", "-s", "/bin/sh", "-c"]
            # the postgres user has to reach the folder: /tmp when TMPDIR is private to root
            base = None if _traversable_by_all(tempfile.gettempdir()) else "/tmp"
        self.root = Path(tempfile.mkdtemp(prefix="kb-pg-", dir=base))
        if self.owner is not None:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in argv]
        if self.prefix[-1:] == ["-c"]:
            cmd = [*self.prefix, shlex.join(cmd)]
        else:
            cmd = [*self.prefix, *cmd]
        return subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)

    def _check(self, what: str, r: subprocess.CompletedProcess) -> None:
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            pytest.fail(f"{what} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{log}", pytrace=False)

    def start(self) -> str:
        self._check("initdb", self._run(self.bin / "initdb", "-D", self.data, "--auth=trust", "-U", PG_USER,
                                        "--encoding=UTF8", "--locale=C", "--no-sync"))
        for attempt in range(3):  # the free port can be taken between the probe and the bind
            self.port = _free_port()
            opts = f"-k {self.data} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off"
            r = self._run(self.bin / "pg_ctl", "-w", "-t", "60", "-D", self.data, "-l", self.log, "-o", opts,
                          "start")
            if r.returncode == 0:
                break
            if attempt == 2:
                self._check("pg_ctl start", r)
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {PG_DB}")
        return self.url(PG_DB)

    def url(self, db: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(self.bin / "pg_ctl", "stop", "-w", "-D", self.data, "-m", "immediate", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session (trust auth, user kb, loopback only, fsync off):
    yields postgresql://kb@127.0.0.1:PORT/kbtest; stopped and deleted at the end."""
    srv = _Server()
    t0 = time.monotonic()
    try:
        url = srv.start()
        # shown with -rA / on failures: what the server costs the session
        print(f"postgres_url: PostgreSQL started in {time.monotonic() - t0:.2f}s at {url} ({srv.bin})")
        yield url
    finally:
        srv.stop()


@pytest.fixture()
def pg_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database t_<random> on the session's server: yields its URL; dropped afterwards
    (WITH (FORCE): connections a test leaves open do not keep it)."""
    import psycopg
    from psycopg import sql

    name = f"t_{secrets.token_hex(6)}"
    base = postgres_url.rsplit("/", 1)[0]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
