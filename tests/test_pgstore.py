"""The document store on PostgreSQL (`store.url: postgresql://…`), for real against a throwaway
server: the same operations give the same answers as on SQLite; KBs are created and dropped
whole; the write lock holds across processes; a killed holder leaves no lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import psycopg
import pytest

from ingest.store import open_store
from ingest.types import Chunk, KeyInfo
from tests.test_store import make_doc, write_doc


def pg_settings(settings, url: str):
    """`settings` with the store on PostgreSQL at `url` (and level 1 on a Milvus Lite file)."""
    from kb.settings import apply_overrides

    return apply_overrides(settings, {"store.url": url, "retrieval.backend": "milvus",
                                      "milvus.uri": str(settings.home / "milvus.db")})


@pytest.fixture(params=["sqlite", "postgresql"])
def any_settings(request, settings):
    if request.param == "sqlite":
        return settings
    return pg_settings(settings, request.getfixturevalue("pg_db_url"))


def test_documents_chunks_and_key_info_are_written_and_replaced_alike(any_settings):
    with open_store(any_settings, "a") as s:
        write_doc(s, make_doc(), 3)
        assert s.counts() == {"documents": 1, "chunks": 3, "key_infos": 4}
        assert s.is_unchanged("d1", "h1") and not s.is_unchanged("d1", "h2")
        write_doc(s, make_doc(h="h2"), 1)
        assert s.counts() == {"documents": 1, "chunks": 1, "key_infos": 2}
        seg = [k for k in s.key_infos() if k["level"] == "segment"]
        assert seg[0]["chunk_id"] == "d1-00000" and seg[0]["raw_text"] == "chunk 0"
        assert seg[0]["title_path"] == [] and isinstance(seg[0]["ki_id"], int)
        ids = [k["ki_id"] for k in s.key_infos()]
        assert [k["ki_id"] for k in s.key_infos(ki_ids=ids[::-1])] and len(s.key_infos(ki_ids=ids)) == 2
        assert s.get_document("d1").title == "A" and [d.doc_id for d in s.documents()] == ["d1"]
        assert s.delete_document("d1") and not s.delete_document("d1")
        assert s.counts() == {"documents": 0, "chunks": 0, "key_infos": 0}


def test_a_failed_write_leaves_the_previous_version(any_settings):
    with open_store(any_settings, "a") as s:
        write_doc(s, make_doc(), 2)
        bad = [KeyInfo("not-a-level", "k", "r", None, 0)]  # violates the CHECK constraint
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            s.replace_document(make_doc(h="h2"), [Chunk("new", 0)], bad)
        assert s.is_unchanged("d1", "h1")
        assert [c["text"] for c in s.chunks()] == ["chunk 0", "chunk 1"]


def test_faq_edits_audit_and_ids_alike(any_settings):
    with open_store(any_settings, "a") as s:
        write_doc(s, make_doc(), 2)
        sid = s.store_id()
        assert len(sid) == 32 and s.store_id() == sid
        assert s.faq_revision() == 0
        s.put_faq([{"faq_id": "f1", "question": "q?", "answer": "a", "q_vec": b"\x00\x01"}])
        s.put_faq([{"faq_id": "f1", "question": "q2?", "answer": "b"},
                   {"faq_id": "f2", "question": "x", "answer": "y"}])
        rows = s.faq_entries()
        assert [(r["faq_id"], r["question"], r["answer"]) for r in rows] == [("f1", "q2?", "b"), ("f2", "x", "y")]
        assert s.faq_revision() == 2 and s.delete_faq(["f1"]) == 1 and s.faq_revision() == 3
        a = s.edit_chunk("d1", 1, "edited one", "ann", [KeyInfo("segment", "k1e", "edited one", 1, 1)])
        b = s.edit_chunk("d1", 1, "edited twice", "bob", [KeyInfo("segment", "k1f", "edited twice", 1, 1)])
        assert b["edit_id"] > a["edit_id"] and b["orig_sha256"] == a["orig_sha256"]
        assert s.chunk("d1", 1)["edit"]["user"] == "bob"
        assert [e["user"] for e in s.chunk_edits("d1")] == ["ann", "bob"]
        chunks, applied = s.apply_edits("d1", [Chunk("chunk 0", 0), Chunk("chunk 1", 1)])
        assert [c.text for c in chunks] == ["chunk 0", "edited twice"] and list(applied) == [1]
        with pytest.raises(LookupError):
            s.edit_chunk("d1", 9, "x", "ann", [])
        with s.snapshot():
            assert s.counts()["chunks"] == 2


def test_a_reader_never_creates_a_kb(any_settings):
    from retrieval.knowledge_base import kb_exists, kb_names

    with pytest.raises(FileNotFoundError):
        open_store(any_settings, "nothing", create=False)
    assert not kb_exists(any_settings, "nothing") and kb_names(any_settings) == []
    with open_store(any_settings, "something") as s:
        write_doc(s, make_doc(), 1)
    assert kb_names(any_settings) == ["something"]


def test_a_deleted_kb_reads_as_gone_and_text_loses_only_nul_characters(settings, pg_db_url):
    """A reader whose KB another host dropped gets StoreGone (404), not an internal error; text
    with NUL characters (which PostgreSQL's text cannot hold) is stored without them."""
    from ingest import pgstore
    from kb.db import StoreGone

    s = pg_settings(settings, pg_db_url)
    reader = open_store(s, "a")
    with open_store(s, "a") as w:
        w.replace_document(make_doc(), [Chunk("nul\x00here", 0)], [KeyInfo("segment", "k\x00", "r", 0, 0)])
    assert [c["text"] for c in reader.chunks()] == ["nulhere"]
    assert pgstore.drop(s.store, "a")
    with pytest.raises(StoreGone) as e:
        reader.chunks()
    assert e.value.status == 404
    reader.close()


def test_store_settings_reach_the_connection_pool_and_the_lock(settings, tmp_path, monkeypatch):
    """store.pool_size, timeout_s and password_env, written in a config file, arrive in the pool's
    and the write lock's connection arguments (the password from the variable, never the file)."""
    import psycopg_pool

    from ingest import pgstore
    from kb import db
    from kb.settings import load_settings

    seen: dict = {}

    class Pool:
        check_connection = None

        def __init__(self, url, **kw):
            seen["pool"] = (url, kw)

        def open(self, **kw):
            seen["open"] = kw

    monkeypatch.setattr(psycopg_pool, "ConnectionPool", Pool)
    monkeypatch.setattr(db, "_pools", {})  # the fake pool and lock stay out of the other tests
    monkeypatch.setattr(db, "_locks", {})
    monkeypatch.setenv("MY_PG_SECRET", "s3cret")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("store: {url: 'postgresql://kb@db.example:5432/kb', pool_size: 5, timeout_s: 7, "
                        "password_env: MY_PG_SECRET}\nretrieval: {backend: milvus}\n")
    st = load_settings(cfg_file).store
    db.pg_pool(st.url, st.password_env, st.pool_size, st.timeout_s)
    url, kw = seen["pool"]
    assert url == "postgresql://kb@db.example:5432/kb" and kw["max_size"] == 5 and kw["timeout"] == 7
    assert kw["kwargs"]["password"] == "s3cret" and kw["kwargs"]["connect_timeout"] == 7
    assert kw["kwargs"]["options"] == "-c statement_timeout=7000" and seen["open"]["timeout"] == 7

    import psycopg

    def connect(url, **kw):
        seen["lock"] = (url, kw)
        raise psycopg.OperationalError("no server here")

    monkeypatch.setattr(psycopg, "connect", connect)
    with pytest.raises(db.StoreUnavailable), pgstore.kb_write_lock(st, "a", 1):
        pass
    assert seen["lock"][1]["password"] == "s3cret" and seen["lock"][1]["connect_timeout"] == 7
    monkeypatch.delenv("MY_PG_SECRET")
    with pytest.raises(db.StoreUnavailable, match="MY_PG_SECRET"):
        db.connect_kwargs(st.password_env)


def test_shared_kbs_are_created_listed_and_dropped_whole(settings, pg_db_url):
    from ingest import pgstore

    s = pg_settings(settings, pg_db_url)
    for name in ("b", "a.b-c", "x" * 64):
        with open_store(s, name) as st:
            write_doc(st, make_doc(), 1)
    assert pgstore.kb_names(s.store) == sorted(["b", "a.b-c", "x" * 64])
    assert pgstore.drop(s.store, "b") and not pgstore.drop(s.store, "b")
    assert not pgstore.exists(s.store, "b") and pgstore.exists(s.store, "a.b-c")
    with psycopg.connect(pg_db_url) as c:
        schemas = {r[0] for r in c.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'kb\\_%'")}
    assert schemas == {"kb_registry", pgstore.schema_name("a.b-c"), pgstore.schema_name("x" * 64)}
    with open_store(s, "b") as st:  # a new KB of the old name starts empty, with a new store id
        assert st.counts()["documents"] == 0
    assert len(pgstore.data_id(s.store)) == 32 and pgstore.data_id(s.store) == pgstore.data_id(s.store)


LOCKER = """
import sys, time
from kb.settings import StoreConfig
from ingest.pgstore import kb_write_lock
with kb_write_lock(StoreConfig(url=sys.argv[1]), "a", 30):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_the_write_lock_holds_across_processes_and_dies_with_its_holder(pg_db_url):
    from ingest.pgstore import kb_write_lock
    from kb.db import LockTimeout
    from kb.settings import StoreConfig

    cfg = StoreConfig(url=pg_db_url)
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, pg_db_url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockTimeout, match="being written"), kb_write_lock(cfg, "a", 0.3):
            pass
        with kb_write_lock(cfg, "other", 0.3), kb_write_lock(cfg, "other", 0.3):  # another KB; reentrant
            pass
    finally:
        proc.kill()  # kill -9: the server ends its session and its lock
        proc.wait()
    t0 = time.monotonic()
    with kb_write_lock(cfg, "a", 10):
        assert time.monotonic() - t0 < 10


def test_a_write_lock_whose_connection_ends_is_reported_lost(pg_db_url):
    """When the server ends the lock's session (so the lock), the writer learns it: before its
    next guarded step and when it lets go."""
    import psycopg

    from ingest.pgstore import check_write_lock, kb_write_lock
    from kb.db import StoreUnavailable
    from kb.settings import StoreConfig

    cfg = StoreConfig(url=pg_db_url)
    with pytest.raises(StoreUnavailable, match="lost"), kb_write_lock(cfg, "a", 5):
        check_write_lock(cfg, "a")  # held: no error
        with psycopg.connect(pg_db_url, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'")
        with pytest.raises(StoreUnavailable, match="lost"):
            check_write_lock(cfg, "a")
    with kb_write_lock(cfg, "a", 1):  # free again
        check_write_lock(cfg, "a")
