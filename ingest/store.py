"""The document store: one SQLite file per knowledge base.

Documents, their chunks and key information, and the key-info → raw-text mapping the two-level
index uses. Every document is written in one transaction, so a crash or Ctrl-C never leaves a
half-written document behind. Writers hold the KB's write lock (kb/writelock.py); readers open the
store with `create=False` and read several tables through one `snapshot()`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ingest.sentences import split_sentences
from ingest.types import Chunk, KeyInfo, ParsedDocument
from kb import faults
from kb.settings import Settings
from kb.sqlutil import in_batches

SCHEMA_VERSION = 2
"""Bumped when tables are added; an older store gets the new tables (CREATE ... IF NOT EXISTS) on open."""
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
CREATE TABLE IF NOT EXISTS faq (
    faq_id TEXT PRIMARY KEY,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    model_id TEXT NOT NULL DEFAULT '',
    q_vec BLOB,
    a_vec BLOB,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunk_edits (
    edit_id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    ord INTEGER NOT NULL,
    orig_sha256 TEXT NOT NULL,
    old_text TEXT NOT NULL,
    new_text TEXT NOT NULL,
    "user" TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS chunk_edits_doc ON chunk_edits(doc_id, orig_sha256);
CREATE TABLE IF NOT EXISTS edited_chunks (
    chunk_id TEXT PRIMARY KEY REFERENCES chunks(chunk_id) ON DELETE CASCADE,
    orig_sha256 TEXT NOT NULL,
    edit_id INTEGER NOT NULL
);
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
            self._set_up()
        self.conn.execute("PRAGMA synchronous = FULL")

    def _set_up(self) -> None:
        """Create the tables, or add a newer version's tables to an older store. An older store that
        cannot be written now (a read-only file, a writer holding it past the timeout) is read as it
        is: reads of the newer tables answer as if they were empty, and writes create them first."""
        older = self._schema_version() is not None
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            with self.conn:
                self.conn.executescript(_SCHEMA)
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE "
                                  "SET value = excluded.value", (str(SCHEMA_VERSION),))
                self.conn.execute("INSERT INTO meta VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
                                  (new_store_id(),))
        except sqlite3.OperationalError:
            if not older:
                raise

    def store_id(self, create: bool = True) -> str | None:
        """A random id given to this store when first asked (kept in its meta table): an index
        held elsewhere (Milvus) records it, so a new store of the same KB name is never taken for
        the old one. `create=False` (readers): None when it has none yet, nothing written."""
        row = self.conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
        if row is None and not create:
            return None
        if row is None:
            with self.conn:
                self.conn.execute("INSERT INTO meta VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
                                  (new_store_id(),))
            row = self.conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
        return row[0]

    def _schema_version(self) -> str | None:
        """The store's schema version, None when it has none yet."""
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return None
        return None if row is None else row[0]

    def _has_schema(self) -> bool:
        return self._schema_version() == str(SCHEMA_VERSION)

    @classmethod
    def for_kb(cls, kb_dir: str | Path, create: bool = True) -> DocStore:
        return cls(Path(kb_dir) / "store.sqlite", create)

    @classmethod
    def over(cls, conn: Any, name: str) -> DocStore:
        """A store over an open connection to a set-up schema (ingest/pgstore.py opens them)."""
        self = cls.__new__(cls)
        self.path, self.conn = Path(name), conn
        return self

    @property
    def dialect(self) -> str:
        """"sqlite" or "postgresql"."""
        return getattr(self.conn, "dialect", "sqlite")

    @contextmanager
    def snapshot(self) -> Iterator[DocStore]:
        """Several reads that see the store as one moment: a read transaction (a writer's commit
        in between is seen by none of them or, after the block, by all)."""
        if self.conn.in_transaction:
            yield self
            return
        pg = self.dialect == "postgresql"
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if pg else "BEGIN")
        try:
            yield self
        finally:
            self.conn.rollback()

    def close(self) -> None:
        self.conn.close()

    def copy_from(self, other: DocStore, batch: int = 1000) -> dict[str, int]:
        """Copy every row of `other` (SQLite or PostgreSQL) into this empty store, in one
        transaction: ids as they are, this store's own schema version and store id. Rows per table."""
        counts: dict[str, int] = {}
        with self.conn:
            if self.counts()["documents"]:
                raise ValueError("the store to copy into is not empty")
            self._faq_table()
            self._edit_tables()
            for table in TABLES:
                try:
                    cur = other.conn.execute(f"SELECT * FROM {table}")  # noqa: S608 (a fixed table name)
                    rows = cur.fetchall()
                except sqlite3.OperationalError:  # an older SQLite store without this table
                    continue
                if table == "meta":
                    rows = [r for r in rows if r[0] not in ("schema_version", "store_id")]
                    self.conn.execute("DELETE FROM meta WHERE key NOT IN ('schema_version', 'store_id')")
                if not rows:
                    counts[table] = 0
                    continue
                names = rows[0].keys()
                cols = ", ".join(f'"{c}"' for c in names)
                sql = f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(rows[0]))})"  # noqa: S608
                for i in range(0, len(rows), batch):
                    self.conn.executemany(sql, [tuple(r) for r in rows[i : i + batch]])
                counts[table] = len(rows)
            if self.dialect == "postgresql":  # identity columns continue after the copied ids
                for table, col in (("key_infos", "ki_id"), ("chunk_edits", "edit_id")):
                    self.conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{col}'), "
                                      f"COALESCE((SELECT MAX({col}) FROM {table}), 0) + 1, false)")
        return counts

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

    def replace_document(self, doc: ParsedDocument, chunks: list[Chunk], key_infos: list[KeyInfo],
                         edits: dict[int, AppliedEdit] | None = None) -> None:
        """Write a document with its chunks and key info, replacing any older version, atomically.
        `edits` (from `apply_edits`): the chunks (by ord) whose text is a person's edit."""
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
            self._insert_key_infos(doc.doc_id, key_infos)
            if edits:
                self._edit_tables()
                self.conn.executemany("INSERT INTO edited_chunks VALUES (?,?,?)",
                                      [(chunk_id(doc.doc_id, o), e.orig_sha256, e.edit_id) for o, e in edits.items()])
        faults.point("store.after_commit")

    def _insert_key_infos(self, doc_id: str, key_infos: list[KeyInfo]) -> None:
        """Insert key information rows of document `doc_id` (inside the caller's transaction)."""
        self.conn.executemany(
            "INSERT INTO key_infos (doc_id, chunk_id, level, ord, key_text, raw_text, title_path,"
            " keywords, entities, summary) VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(doc_id, None if k.chunk_ord is None else chunk_id(doc_id, k.chunk_ord), k.level, k.ord,
              k.key_text, k.raw_text, json.dumps(k.title_path, ensure_ascii=False),
              json.dumps(k.keywords, ensure_ascii=False), json.dumps(k.entities, ensure_ascii=False),
              k.summary) for k in key_infos])

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
            return [_decode(dict(r)) for r in in_batches(self.conn, q + " WHERE k.ki_id IN ({})", ki_ids)]
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

    # FAQ entries (serve/faq.py) -------------------------------------------------------------------
    def faq_entries(self) -> list[dict]:
        """Every FAQ entry: faq_id, question, answer, stage ('' for any), model_id and the cached
        question/answer vectors (float32 bytes of that embedder), oldest first; [] when none."""
        try:
            rows = self.conn.execute("SELECT * FROM faq ORDER BY updated_at, faq_id").fetchall()
        except sqlite3.OperationalError:  # a store from before the faq table, opened read-only
            return []
        return [dict(r) for r in rows]

    def faq_revision(self) -> int:
        """A number that changes on every FAQ write (readers reload their FAQ when it does)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key='faq_revision'").fetchone()
        return int(row[0]) if row else 0

    def put_faq(self, rows: list[dict]) -> None:
        """Insert or replace FAQ entries (the faq table's columns but updated_at), in one transaction."""
        if not rows:
            return
        now = time.time()
        with self.conn:
            self._faq_table()
            self.conn.executemany(
                "INSERT INTO faq VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (faq_id) DO UPDATE SET question = "
                "excluded.question, answer = excluded.answer, stage = excluded.stage, model_id = excluded.model_id, "
                "q_vec = excluded.q_vec, a_vec = excluded.a_vec, updated_at = excluded.updated_at",
                [(r["faq_id"], r["question"], r["answer"], r.get("stage") or "", r.get("model_id") or "",
                  r.get("q_vec"), r.get("a_vec"), now) for r in rows])
            self._bump_faq_revision()

    def delete_faq(self, faq_ids: list[str] | None = None) -> int:
        """Delete the FAQ entries `faq_ids` (None: all of them); how many were deleted."""
        with self.conn:
            self._faq_table()
            if faq_ids is None:
                n = self.conn.execute("DELETE FROM faq").rowcount
            else:
                n = sum(self.conn.execute("DELETE FROM faq WHERE faq_id=?", (i,)).rowcount for i in faq_ids)
            if n:
                self._bump_faq_revision()
        return n

    def _faq_table(self) -> None:
        if self.dialect == "sqlite":  # a PostgreSQL schema is made whole
            self.conn.execute(_FAQ_TABLE)

    def _bump_faq_revision(self) -> None:
        self.conn.execute("INSERT INTO meta VALUES ('faq_revision', '1') ON CONFLICT (key) DO UPDATE "
                          "SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)")


    # chunk edits (retrieval/knowledge_base.py edit_chunk) --------------------------------------------------------
    def chunk(self, doc_id: str, ord_: int) -> dict | None:
        """One chunk of a document by its ord, with its latest edit (`edit`: None if never edited)."""
        row = self.conn.execute("SELECT c.*, d.source FROM chunks c JOIN documents d USING (doc_id) "
                                "WHERE c.doc_id=? AND c.ord=?", (doc_id, ord_)).fetchone()
        return None if row is None else self._with_edit(_decode(dict(row)))

    def edited(self, doc_id: str) -> dict[str, dict]:
        """chunk_id -> its latest edit (edit_id, user, at, orig_sha256) for the document's edited chunks."""
        try:
            rows = self.conn.execute(
                'SELECT x.chunk_id, e.edit_id, e."user", e.at, x.orig_sha256 FROM edited_chunks x JOIN chunk_edits e '
                "USING (edit_id) JOIN chunks c ON c.chunk_id = x.chunk_id WHERE c.doc_id=?", (doc_id,)).fetchall()
        except sqlite3.OperationalError:  # a store from before the edit tables, opened read-only
            return {}
        return {r["chunk_id"]: {k: r[k] for k in ("edit_id", "user", "at", "orig_sha256")} for r in rows}

    def chunk_edits(self, doc_id: str | None = None) -> list[dict]:
        """The audit of chunk edits (every one, oldest first; kept when the document is re-ingested or removed)."""
        q, args = "SELECT * FROM chunk_edits", ()
        if doc_id:
            q, args = q + " WHERE doc_id=?", (doc_id,)
        try:
            return [dict(r) for r in self.conn.execute(q + " ORDER BY edit_id", args)]
        except sqlite3.OperationalError:
            return []

    def edit_chunk(self, doc_id: str, ord_: int, new_text: str, user: str, key_infos: list[KeyInfo]) -> dict:
        """Replace one chunk's text, its segment and sentence key info and its document's article key
        info (`key_infos`: those levels, extracted from the edited text), and audit the edit, in one
        transaction. The edit is remembered by the hash of the chunk's parsed text (`apply_edits`).
        Returns the audit row; LookupError when the chunk does not exist."""
        cid = chunk_id(doc_id, ord_)
        with self.conn:
            self._edit_tables()
            row = self.conn.execute("SELECT text FROM chunks WHERE chunk_id=?", (cid,)).fetchone()
            if row is None:
                raise LookupError(f"no chunk {ord_} in document {doc_id!r}")
            mark = self.conn.execute("SELECT orig_sha256 FROM edited_chunks WHERE chunk_id=?", (cid,)).fetchone()
            orig = mark[0] if mark else text_sha256(row[0])
            now = time.time()
            edit_id = self.conn.execute(
                'INSERT INTO chunk_edits (doc_id, chunk_id, ord, orig_sha256, old_text, new_text, "user", at) '
                "VALUES (?,?,?,?,?,?,?,?) RETURNING edit_id", (doc_id, cid, ord_, orig, row[0], new_text, user,
                                                               now)).fetchone()[0]
            self.conn.execute("UPDATE chunks SET text=? WHERE chunk_id=?", (new_text, cid))
            self.conn.execute("INSERT INTO edited_chunks VALUES (?,?,?) ON CONFLICT (chunk_id) DO UPDATE SET "
                              "orig_sha256 = excluded.orig_sha256, edit_id = excluded.edit_id", (cid, orig, edit_id))
            # new rows (new ki_ids): the index sync embeds them and drops the old ones
            self.conn.execute("DELETE FROM key_infos WHERE chunk_id=? OR (doc_id=? AND level='article')", (cid, doc_id))
            self._insert_key_infos(doc_id, key_infos)
        return {"edit_id": edit_id, "doc_id": doc_id, "chunk_id": cid, "ord": ord_, "orig_sha256": orig,
                "old_text": row[0], "new_text": new_text, "user": user, "at": now}

    def apply_edits(self, doc_id: str, chunks: list[Chunk]) -> tuple[list[Chunk], dict[int, AppliedEdit]]:
        """The freshly parsed `chunks` of a document with people's edits put back: a chunk whose
        parsed text has the hash an edit was made on gets that edit's (latest) text. Returns the
        chunks and, by ord, the edits applied (for `replace_document`)."""
        try:
            rows = self.conn.execute(
                "SELECT e.orig_sha256, e.edit_id, e.new_text FROM chunk_edits e WHERE e.doc_id=? AND e.edit_id = "
                "(SELECT MAX(edit_id) FROM chunk_edits WHERE doc_id=e.doc_id AND orig_sha256=e.orig_sha256)",
                (doc_id,)).fetchall()
        except sqlite3.OperationalError:
            return chunks, {}
        latest = {r[0]: (r[1], r[2]) for r in rows}
        if not latest:
            return chunks, {}
        out: list[Chunk] = []
        applied: dict[int, AppliedEdit] = {}
        for c in chunks:
            orig = text_sha256(c.text)
            if orig in latest:
                edit_id, text = latest[orig]
                applied[c.ord] = AppliedEdit(orig, edit_id)
                c = replace(c, text=text, sentences=split_sentences(text))
            out.append(c)
        return out, applied

    def _edit_tables(self) -> None:
        """Create the edit tables in a store set up before they existed (inside the caller's transaction)."""
        if self.dialect == "sqlite":  # a PostgreSQL schema is made whole
            for ddl in _EDIT_TABLES:
                self.conn.execute(ddl)

    def _with_edit(self, row: dict) -> dict:
        row["edit"] = self.edited(row["doc_id"]).get(row["chunk_id"])
        return row


def schema_ddl(dialect: str) -> list[str]:
    """The store's tables and indexes, one statement each, in `dialect` ("sqlite" or "postgresql"):
    the same tables and columns; PostgreSQL's own types for SQLite's AUTOINCREMENT, BLOB and REAL."""
    ddl = _SCHEMA
    if dialect == "postgresql":
        ddl = (ddl.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
               .replace(" INTEGER", " BIGINT").replace(" BLOB", " BYTEA").replace(" REAL", " DOUBLE PRECISION"))
    return [d.strip() for d in ddl.split(";") if d.strip()]


TABLES = ("meta", "documents", "chunks", "key_infos", "faq", "chunk_edits", "edited_chunks")
"""The store's tables, each after those it references (the order a copy inserts them in)."""


def open_store(settings: Settings, kb: str, create: bool = True) -> DocStore:
    """The document store of KB `kb`: its SQLite file (`store.url: sqlite://`) or its schema in
    the shared PostgreSQL. `create=False`: FileNotFoundError when the KB has none."""
    if settings.store.shared:
        from ingest.pgstore import open_shared

        return open_shared(settings.store, kb, create)
    return DocStore.for_kb(settings.kb_dir(kb), create)


def new_store_id() -> str:
    """A store's random id, given when it is made (a new store of the same KB name gets another)."""
    import uuid

    return uuid.uuid4().hex


def chunk_id(doc_id: str, ord_: int) -> str:
    """The id of a document's chunk number `ord_`: `DOCID-00000`."""
    return f"{doc_id}-{ord_:05d}"


_FAQ_TABLE = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS faq"):].split(";")[0]
"""The faq table's DDL alone: written before each FAQ write (a store set up before the table existed)."""


@dataclass(frozen=True)
class AppliedEdit:
    """A person's edit put back on a re-parsed chunk: the parsed text's hash and the edit's id."""

    orig_sha256: str
    edit_id: int


def text_sha256(text: str) -> str:
    """The hash a chunk's parsed text is remembered by (chunk edits)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_EDIT_TABLES = [d.strip() for d in _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS chunk_edits"):].split(";")
                if d.strip()]
"""The DDL of the chunk-edit tables and index, one statement each (run before each edit write)."""


def _decode(row: dict) -> dict:
    for key in ("title_path", "keywords", "entities"):
        if key in row and isinstance(row[key], str):
            row[key] = json.loads(row[key])
    return row
