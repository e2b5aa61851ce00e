"""`kb migrate`: a knowledge base from one configuration's backend to another's (FAISS in the KB's
folder <-> Milvus), verified by counts and by searching both."""

from __future__ import annotations

import logging
import random
import shutil
import sqlite3
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np

from ingest.store import DocStore
from kb.fsutil import building_dir, replacing_file, umask_mode
from kb.settings import Settings
from kb.writelock import LOCK_NAME
from retrieval.index import IndexDir, desired_entries
from retrieval.knowledge_base import KnowledgeBase

log = logging.getLogger(__name__)
SKIP_DIRS = {"index"}
"""Level 1 is rebuilt from the store (and the embedding cache) by the target backend."""
SKIP_SUFFIXES = ("-wal", "-shm", "-journal")
"""SQLite's side files: the backup API copies a database whole, with what they hold."""


class MigrationMismatch(RuntimeError):
    """The migrated KB does not hold what the source holds, or does not answer as it does."""


def copy_kb_files(src: Path, dest: Path, written: list[Path], with_store: bool = True) -> None:
    """Copy a KB folder's files into `dest` (which the caller holds locked, and which holds no
    store), each through a temporary beside it (`kb.fsutil.replacing_file`, `building_dir`), SQLite
    files through SQLite's backup (consistent while others read) and the store last, since a
    store is what makes a folder a KB. `written` gets each path before it is written, so a
    failure part-way can be undone."""
    items = sorted((i for i in src.iterdir() if i.name not in SKIP_DIRS and i.name != LOCK_NAME
                    and not i.name.endswith(SKIP_SUFFIXES) and (i.is_dir() or i.is_file())
                    and (with_store or i.name != "store.sqlite")),
                   key=lambda i: i.name == "store.sqlite")
    for item in items:
        final = dest / item.name
        written.append(final)
        if item.is_dir():  # building_dir replaces what a killed earlier attempt left
            with building_dir(final, mode=umask_mode(0o777)) as tmp:
                shutil.copytree(item, tmp, dirs_exist_ok=True)
            continue
        _remove_path(final)  # with its SQLite side files, which must not meet the new database
        if item.suffix == ".sqlite":
            with replacing_file(final, mode=umask_mode(0o666)) as tmp, \
                    closing(sqlite3.connect(item)) as a, closing(sqlite3.connect(tmp)) as b:
                a.backup(b)
        else:
            with replacing_file(final) as tmp:
                shutil.copy2(item, tmp)


def _remove_path(path: Path) -> None:
    """Remove a file (with its SQLite side files) or a folder, if there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    for p in (path, *(path.with_name(path.name + s) for s in SKIP_SUFFIXES)):
        if not p.is_dir():
            p.unlink(missing_ok=True)


def remove_copied(paths: list[Path]) -> None:
    """Undo `copy_kb_files`: the store first (the folder stops being a KB), then the rest."""
    for path in sorted(paths, key=lambda x: x.name != "store.sqlite"):
        _remove_path(path)


def sample_queries(kb: KnowledgeBase, n: int, seed: int = 0) -> list[str]:
    """Up to `n` queries drawn from the KB's own key information (its key texts)."""
    with kb.store() as store:
        texts = [r[0] for r in store.conn.execute("SELECT key_text FROM key_infos WHERE key_text != ''")]
    random.Random(seed).shuffle(texts)
    return [t[:200] for t in texts[:n]]


def level1_place(settings: Settings, name: str) -> tuple:
    """Where a configuration keeps KB `name`'s level 1: a Milvus alias (uri, database, alias) or
    the KB's folder (auto and torch search the FAISS files there too)."""
    if settings.retrieval.backend == "milvus":
        from retrieval.milvus import collection_base, resolved_uri

        uri = resolved_uri(settings.milvus, settings.home)
        uri = uri if "://" in uri else str(Path(uri).resolve())
        return ("milvus", uri, settings.milvus.db_name, collection_base(settings.milvus.collection_prefix, name))
    return ("faiss", str(settings.kb_dir(name).resolve()))


def store_place(settings: Settings, name: str) -> tuple:
    """Where a configuration keeps KB `name`'s store: a PostgreSQL database or the KB's folder."""
    if settings.store.shared:
        from kb.db import redact

        return ("postgresql", redact(settings.store.url))
    return ("sqlite", str(settings.kb_dir(name).resolve()))


def migrate_kb(source: Settings, target: Settings, name: str, queries: int = 100, min_agreement: float = 0.95,
               progress: bool = False) -> dict:
    """Make KB `name` of `source` available under `target` (its store, data folder and level-1
    backend): the store is copied when it moves (a SQLite file as a file, into or out of
    PostgreSQL row by row in one transaction), the KB folder's other files when the data folders
    differ; level 1 is built by the target backend (vectors come from the embedding cache when the
    embedder is the same); then the target's entries must equal the store's and the top 5 of
    `queries` sampled key texts must agree for `min_agreement` of them. Both KBs' write locks are
    held throughout; on a mismatch or an error the target's level 1 goes back to the generation it
    had and what was copied is removed. The source is never changed."""
    src = KnowledgeBase(source, name)
    if level1_place(source, name) == level1_place(target, name):
        raise ValueError("the source and target configurations put this KB's index in the same place")
    moved = store_place(source, name) != store_place(target, name)
    dst = KnowledgeBase(target, name, create=True)
    sides = sorted([(store_place(source, name), src), (store_place(target, name), dst)], key=lambda x: x[0])
    with ExitStack() as stack:
        for _, kb in sides:  # one order, whichever way two migrations run
            stack.enter_context(kb.writing(create=kb is dst))
        if moved and dst.exists():
            raise ValueError(f"knowledge base {name!r} already exists in the target's store (remove it there first: "
                             f"kb rm --kb {name} --config TARGET)")
        written: list[Path] = []
        previous, made = None, False
        try:
            if moved:
                copy_store(src, dst, written)
                made = True  # only now is there a KB of this run's in the target's store
            previous = dst.index_generation()
            return _build_and_verify(src, dst, previous, queries, min_agreement, progress)
        except BaseException:
            _undo(dst, previous, made, written)
            raise


def _undo(dst: KnowledgeBase, previous: str | None, made: bool, written: list[Path]) -> None:
    """After a failed migration: the target's level 1 back to `previous`, the KB this run made in a
    shared store dropped, copied files removed; each step tried whatever the others do (the
    migration's own error is the one reported)."""
    steps = [("put the target's level 1 back", lambda: dst.milvus().revert_to(previous) if dst.uses_milvus
              else IndexDir(dst.dir).revert_to(previous))]
    if made and dst.settings.store.shared:
        from ingest import pgstore

        steps.append(("drop the copied KB from the shared store", lambda: pgstore.drop(dst.settings.store, dst.name)))
    steps.append(("remove the copied files", lambda: remove_copied(written)))
    for what, step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001
            log.exception("could not %s after a failed migration of %s", what, dst.name)


def copy_store(src: KnowledgeBase, dst: KnowledgeBase, written: list[Path]) -> None:
    """Copy the source KB's store, and its folder's other files when the folders differ, to the target."""
    if src.dir.resolve() != dst.dir.resolve() and src.dir.is_dir():
        if not src.settings.store.shared and not dst.settings.store.shared:
            copy_kb_files(src.dir, dst.dir, written)  # the SQLite store as a file, last
            return
        dst.dir.mkdir(parents=True, exist_ok=True)
        copy_kb_files(src.dir, dst.dir, written, with_store=False)
    with src.store() as a:
        if dst.settings.store.shared:  # schema, rows and registry row in one transaction
            from ingest import pgstore

            pgstore.create_copy(dst.settings.store, dst.name, a)
            return
        final = dst.dir / "store.sqlite"
        written.append(final)
        with replacing_file(final, mode=umask_mode(0o666)) as tmp, closing(DocStore(tmp)) as b:
            b.copy_from(a)


def _build_and_verify(src: KnowledgeBase, dst: KnowledgeBase, previous: str | None, queries: int,
                      min_agreement: float, progress: bool) -> dict:
    """Build the target's level 1 and compare it with the source; the report, or MigrationMismatch."""
    info = dst.sync(progress, rebuild=True)
    with src.store() as store:
        counts = store.counts()
        expected = len(desired_entries(store, dst.settings.retrieval)[0])
    with dst.store() as store:
        target_counts = store.counts()
    vectors = {"store": expected, "source": src.vector_count(), "target": dst.vector_count()}
    if target_counts != counts or vectors["target"] != expected:
        raise MigrationMismatch(f"counts differ after migrating {src.name!r}: store {counts} -> {target_counts}, "
                                f"level-1 entries {vectors}")
    qs = sample_queries(src, queries)
    same = [[(h.doc_id, h.chunk_id) for h in a] == [(h.doc_id, h.chunk_id) for h in b]
            for a, b in zip(src.search_many(qs, 5), dst.search_many(qs, 5))]
    agreement = float(np.mean(same)) if same else 1.0
    out = {"kb": src.name, "from": level1_place(src.settings, src.name)[0],
           "to": level1_place(dst.settings, dst.name)[0], "source": counts, "target": target_counts,
           "vectors": vectors, "generation": info["generation"], "replaced": previous, "queries": len(qs),
           "same_top5": round(agreement, 4)}
    if agreement < min_agreement:
        raise MigrationMismatch(f"the migrated KB agrees on the top 5 of {agreement:.1%} of {len(qs)} sampled "
                                f"queries, under {min_agreement:.0%}: {out}")
    return out
