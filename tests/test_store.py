import sqlite3

import pytest

from ingest.store import DocStore
from ingest.types import Chunk, KeyInfo, ParsedDocument


def make_doc(doc_id="d1", h="h1"):
    return ParsedDocument("/x/a.txt", "a.txt", doc_id, h, [], title="A", size=3)


def write_doc(store, doc, n=2):
    chunks = [Chunk(f"chunk {i}", i) for i in range(n)]
    kis = [KeyInfo("article", "k", "all", None, 0)] + [KeyInfo("segment", f"k{i}", f"chunk {i}", i, i)
                                                         for i in range(n)]
    store.replace_document(doc, chunks, kis)


def test_replace_and_delete_cascade(tmp_path):
    with DocStore.for_kb(tmp_path) as s:
        write_doc(s, make_doc(), 3)
        assert s.counts() == {"documents": 1, "chunks": 3, "key_infos": 4}
        assert s.is_unchanged("d1", "h1") and not s.is_unchanged("d1", "h2")
        write_doc(s, make_doc(h="h2"), 1)  # a changed file replaces its old chunks
        assert s.counts() == {"documents": 1, "chunks": 1, "key_infos": 2}
        seg = [k for k in s.key_infos() if k["level"] == "segment"]
        assert seg[0]["chunk_id"] == "d1-00000" and seg[0]["raw_text"] == "chunk 0"
        assert s.delete_document("d1") and s.counts() == {"documents": 0, "chunks": 0, "key_infos": 0}


def test_failed_write_leaves_previous_version(tmp_path):
    with DocStore.for_kb(tmp_path) as s:
        write_doc(s, make_doc(), 2)
        bad = [KeyInfo("not-a-level", "k", "r", None, 0)]  # violates the CHECK constraint
        with pytest.raises(sqlite3.IntegrityError):
            s.replace_document(make_doc(h="h2"), [Chunk("new", 0)], bad)
        assert s.is_unchanged("d1", "h1")
        assert [c["text"] for c in s.chunks()] == ["chunk 0", "chunk 1"]


def test_a_reader_opens_the_store_beside_a_writers_open_transaction(tmp_path):
    with DocStore.for_kb(tmp_path) as s:
        write_doc(s, make_doc(), 2)
    writer = sqlite3.connect(str(tmp_path / "store.sqlite"), timeout=0)
    writer.execute("BEGIN IMMEDIATE")  # a writer in the middle of a document's transaction
    writer.execute("DELETE FROM chunks")
    try:
        reader = DocStore.for_kb(tmp_path, create=False)
        reader.conn.execute("PRAGMA busy_timeout = 100")
        with reader.snapshot():
            assert reader.counts() == {"documents": 1, "chunks": 2, "key_infos": 3}
        reader.close()
    finally:
        writer.rollback()
        writer.close()


def test_a_reader_never_creates_a_store(tmp_path):
    with pytest.raises(FileNotFoundError):
        DocStore.for_kb(tmp_path / "gone", create=False)
    assert not (tmp_path / "gone").exists()


def _v1_store(tmp_path):
    """A store as the schema-1 code left it (its tables are the start of today's schema), with a document."""
    from ingest import store as store_mod

    path = tmp_path / "store.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(store_mod._SCHEMA[: store_mod._SCHEMA.index("CREATE TABLE IF NOT EXISTS faq")])
    with conn:
        conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    with DocStore.__new__(DocStore) as s:  # a document written through the store, without opening (upgrading) it
        s.path, s.conn = path, conn
        write_doc(s, make_doc(), 2)
    return path


def test_a_schema_1_store_is_upgraded_on_open_and_read_as_it_is_when_it_cannot_be_written(tmp_path, monkeypatch):
    path = _v1_store(tmp_path)
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real(*a, **{**kw, "timeout": 0.2}))
    holder = real(path)
    holder.execute("BEGIN IMMEDIATE")  # another process writing: the upgrade cannot take the lock
    try:
        with DocStore(path, create=False) as s:
            assert [d.doc_id for d in s.documents()] == ["d1"] and len(s.chunks("d1")) == 2
            assert s.faq_entries() == [] and s.chunk_edits() == [] and s.edited("d1") == {}
            assert s.chunk("d1", 0)["edit"] is None and s.faq_revision() == 0
            assert s.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    finally:
        holder.rollback()
        holder.close()
    with DocStore(path, create=False) as s:  # writable again: upgraded, the document kept
        assert s.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
        assert [d.doc_id for d in s.documents()] == ["d1"] and s.faq_entries() == []
        s.put_faq([{"faq_id": "f", "question": "q", "answer": "a"}])
        assert s.edit_chunk("d1", 0, "new text", "u", [])["edit_id"] == 1 and s.edited("d1")
