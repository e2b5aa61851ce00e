import sqlite3

import pytest

from ingest.store import DocStore
from ingest.types import Chunk, KeyInfo, ParsedDocument


def _doc(doc_id="d1", h="h1"):
    return ParsedDocument("/x/a.txt", "a.txt", doc_id, h, [], title="A", size=3)


def _write(store, doc, n=2):
    chunks = [Chunk(f"chunk {i}", i) for i in range(n)]
    kis = [KeyInfo("article", "k", "all", None, 0)] + [KeyInfo("segment", f"k{i}", f"chunk {i}", i, i) for i in range(n)]
    store.replace_document(doc, chunks, kis)


def test_replace_and_delete_cascade(tmp_path):
    with DocStore.for_kb(tmp_path) as s:
        _write(s, _doc(), 3)
        assert s.counts() == {"documents": 1, "chunks": 3, "key_infos": 4}
        assert s.is_unchanged("d1", "h1") and not s.is_unchanged("d1", "h2")
        _write(s, _doc(h="h2"), 1)  # a changed file replaces its old chunks
        assert s.counts() == {"documents": 1, "chunks": 1, "key_infos": 2}
        seg = [k for k in s.key_infos() if k["level"] == "segment"]
        assert seg[0]["chunk_id"] == "d1-00000" and seg[0]["raw_text"] == "chunk 0"
        assert s.delete_document("d1") and s.counts() == {"documents": 0, "chunks": 0, "key_infos": 0}


def test_failed_write_leaves_previous_version(tmp_path):
    with DocStore.for_kb(tmp_path) as s:
        _write(s, _doc(), 2)
        bad = [KeyInfo("not-a-level", "k", "r", None, 0)]  # violates the CHECK constraint
        with pytest.raises(sqlite3.IntegrityError):
            s.replace_document(_doc(h="h2"), [Chunk("new", 0)], bad)
        assert s.is_unchanged("d1", "h1")
        assert [c["text"] for c in s.chunks()] == ["chunk 0", "chunk 1"]


def test_a_reader_opens_the_store_beside_a_writers_open_transaction(tmp_path):
    with DocStore.for_kb(tmp_path) as s:
        _write(s, _doc(), 2)
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
