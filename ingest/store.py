"""The document store: one SQLite file per knowledge base.

Documents, their chunks and key information, and the key-info → raw-text mapping the two-level
index uses. Every document is written in one transaction, so a crash or Ctrl-C never leaves a
half-written document behind. Writers hold the KB's write lock (kb/writelock.py); readers open the
store with `create=False` and read several tables through one `snapshot()`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ingest.types import Chunk, KeyInfo, ParsedDocument
from kb import faults

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    source TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    n_chunks INTEGER NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id TEXT PRIMARY KEY,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    text TEXT NOT NULL,
    title_path TEXT NOT NULL,
    page INTEGER
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id, ord);
CREATE TABLE IF NOT EXISTS key_infos (
    ki_id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id) ON DELETE CASCADE,
    chunk_id TEXT REFERENCES chunks(chunk_id) ON DELETE CASCADE,
    level TEXT NOT NULL CHECK (level IN ('article', 'segment', 'sentence')),
    ord INTEGER NOT NULL,
    key_text TEXT NOT NULL,
    raw_text TEXT NOT NULL,
    title_path TEXT NOT NULL,
    keywords TEXT NOT NULL,
    entities TEXT NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS key_infos_doc ON key_infos(doc_id);
"""


@dataclass
class StoredDocument:
    doc_id: str
    path: str
    source: str
    content_hash: str
    title: str
    n_chunks: int


class DocStore:
    """SQLite-backed store of one knowledge base (`<kb_dir>/store.sqlite`)."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        """Open the store at `path`; `create=False` (readers): FileNotFoundError when there is
        none, instead of creating an empty one (a KB deleted meanwhile stays deleted)."""
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        else:
            try:
                self.conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=rw", uri=True, timeout=30,
                                            check_same_thread=False)
            except sqlite3.OperationalError as e:
                raise FileNotFoundError(f"no document store at {self.path}") from e
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        if not self._has_schema():  # readers of a set-up store write nothing
            self.conn.execute("PRAGMA journal_mode = WAL")
            with self.conn:
                self.conn.executescript(_SCHEMA)
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self.conn.execute("PRAGMA synchronous = FULL")

    def _has_schema(self) -> bool:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return False
        return row is not None and row[0] == str(SCHEMA_VERSION)

    @classmethod
    def for_kb(cls, kb_dir: str | Path, create: bool = True) -> DocStore:
        return cls(Path(kb_dir) / "store.sqlite", create)

    @contextmanager
    def snapshot(self) -> Iterator[DocStore]:
        """Several reads that see the store as one moment: a read transaction (a writer's commit
        in between is seen by none of them or, after the block, by all)."""
        if self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN")
        try:
            yield self
        finally:
            self.conn.rollback()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> DocStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # documents -------------------------------------------------------------------------------
    def get_document(self, doc_id: str) -> StoredDocument | None:
        row = self.conn.execute(
            "SELECT doc_id, path, source, content_hash, title, n_chunks FROM documents WHERE doc_id=?",
            (doc_id,)).fetchone()
        return StoredDocument(**dict(row)) if row else None

    def documents(self) -> list[StoredDocument]:
        rows = self.conn.execute(
            "SELECT doc_id, path, source, content_hash, title, n_chunks FROM documents ORDER BY source")
        return [StoredDocument(**dict(r)) for r in rows]

    def is_unchanged(self, doc_id: str, content_hash: str) -> bool:
        doc = self.get_document(doc_id)
        return doc is not None and doc.content_hash == content_hash

    def replace_document(self, doc: ParsedDocument, chunks: list[Chunk], key_infos: list[KeyInfo]) -> None:
        """Write a document with its chunks and key info, replacing any older version, atomically."""
        with self.conn:  # one transaction: all or nothing
            self.conn.execute("DELETE FROM documents WHERE doc_id=?", (doc.doc_id,))
            self.conn.execute(
                "INSERT INTO documents VALUES (?,?,?,?,?,?,?,?)",
                (doc.doc_id, doc.path, doc.source, doc.content_hash, doc.size, doc.title,
                 len(chunks), time.time()))
            self.conn.executemany(
                "INSERT INTO chunks VALUES (?,?,?,?,?,?)",
                [(chunk_id(doc.doc_id, c.ord), doc.doc_id, c.ord, c.text, json.dumps(c.title_path,
                  ensure_ascii=False), c.page) for c in chunks])
            self.conn.executemany(
                "INSERT INTO key_infos (doc_id, chunk_id, level, ord, key_text, raw_text, title_path,"
                " keywords, entities, summary) VALUES (?,?,?,?,?,?,?,?,?,?)",
                [(doc.doc_id, None if k.chunk_ord is None else chunk_id(doc.doc_id, k.chunk_ord),
                  k.level, k.ord, k.key_text, k.raw_text, json.dumps(k.title_path, ensure_ascii=False),
                  json.dumps(k.keywords, ensure_ascii=False), json.dumps(k.entities, ensure_ascii=False),
                  k.summary) for k in key_infos])
        faults.point("store.after_commit")

    def delete_document(self, doc_id: str) -> bool:
        with self.conn:
            cur = self.conn.execute("DELETE FROM documents WHERE doc_id=?", (doc_id,))
        return cur.rowcount > 0

    # reads -------------------------------------------------------------------------------------
    def chunks(self, doc_id: str | None = None) -> list[dict]:
        q = "SELECT c.*, d.source FROM chunks c JOIN documents d USING (doc_id)"
        args: tuple = ()
        if doc_id:
            q += " WHERE c.doc_id=?"
            args = (doc_id,)
        return [_decode(dict(r)) for r in self.conn.execute(q + " ORDER BY c.doc_id, c.ord", args)]

    def key_infos(self, doc_id: str | None = None, ki_ids: list[int] | None = None) -> list[dict]:
        q = "SELECT k.*, d.source FROM key_infos k JOIN documents d USING (doc_id)"
        args: tuple = ()
        if doc_id:
            q += " WHERE k.doc_id=?"
            args = (doc_id,)
        elif ki_ids is not None:
            rows: list[dict] = []
            for i in range(0, len(ki_ids), 900):
                part = ki_ids[i : i + 900]
                rows += [_decode(dict(r)) for r in self.conn.execute(
                    q + f" WHERE k.ki_id IN ({','.join('?' * len(part))})", part)]
            return rows
        return [_decode(dict(r)) for r in self.conn.execute(q + " ORDER BY k.ki_id", args)]

    def iter_unit_texts(self) -> Iterator[tuple[str, list[str]]]:
        """(doc_id, sentences of each chunk in order) for NSP training on stored text."""
        for d in self.documents():
            rows = self.conn.execute(
                "SELECT raw_text FROM key_infos WHERE doc_id=? AND level='segment' ORDER BY ord", (d.doc_id,))
            yield d.doc_id, [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        one = lambda q: self.conn.execute(q).fetchone()[0]  # noqa: E731
        return {"documents": one("SELECT COUNT(*) FROM documents"),
                "chunks": one("SELECT COUNT(*) FROM chunks"),
                "key_infos": one("SELECT COUNT(*) FROM key_infos")}


def chunk_id(doc_id: str, ord_: int) -> str:
    return f"{doc_id}-{ord_:05d}"


def _decode(row: dict) -> dict:
    for key in ("title_path", "keywords", "entities"):
        if key in row and isinstance(row[key], str):
            row[key] = json.loads(row[key])
    return row
