"""`kb migrate`: a knowledge base from one configuration's backend to another's (FAISS in the KB's
folder <-> Milvus), verified by counts and by searching both."""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import numpy as np

from kb.fsutil import building_dir, umask_mode
from kb.settings import Settings
from kb.writelock import LOCK_NAME
from retrieval.index import desired_entries
from retrieval.kb import KnowledgeBase

SKIP_DIRS = {"index"}
"""Level 1 is rebuilt from the store (and the embedding cache) by the target backend."""
SKIP_SUFFIXES = ("-wal", "-shm", "-journal")
"""SQLite's side files: the backup API copies a database whole, with what they hold."""


class MigrationMismatch(RuntimeError):
    """The migrated KB does not hold what the source holds, or does not answer as it does."""


def copy_kb_folder(src: Path, dest: Path) -> None:
    """Copy a KB folder (SQLite files through SQLite's backup, consistent while others read)
    beside `dest`, then rename it into place."""
    with building_dir(dest, mode=umask_mode(0o777)) as tmp:
        for item in src.iterdir():
            if item.name in SKIP_DIRS or item.name == LOCK_NAME or item.name.endswith(SKIP_SUFFIXES):
                continue
            if item.suffix == ".sqlite":
                with sqlite3.connect(item) as a, sqlite3.connect(tmp / item.name) as b:
                    a.backup(b)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.is_file():
                shutil.copy2(item, tmp / item.name)


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


def migrate_kb(source: Settings, target: Settings, name: str, queries: int = 100, min_agreement: float = 0.95,
               progress: bool = False) -> dict:
    """Make KB `name` of `source` available under `target` (its data folder and level-1 backend):
    the folder is copied when the data folders differ, level 1 is built by the target backend
    (vectors come from the embedding cache when the embedder is the same); then the target's
    entries must equal the store's and the top 5 of `queries` sampled key texts must agree for
    `min_agreement` of them. On a mismatch or an error, what this call created is removed; the
    source is never changed."""
    src = KnowledgeBase(source, name)
    if level1_place(source, name) == level1_place(target, name):
        raise ValueError("the source and target configurations put this KB's index in the same place")
    copied = Path(target.home).resolve() != Path(source.home).resolve()
    if copied and target.kb_dir(name).exists():
        raise ValueError(f"knowledge base {name!r} already exists under {target.home} (remove it there first: "
                         f"kb rm --kb {name} --config TARGET)")
    made_collections = False
    try:
        with src.writing():
            if copied:
                copy_kb_folder(src.dir, target.kb_dir(name))
            dst = KnowledgeBase(target, name)
            made_collections = dst.uses_milvus and dst.milvus().current() is None
            info = dst.sync(progress, rebuild=True)
            with src.store() as store:
                counts = store.counts()
                expected = len(desired_entries(store, target.retrieval)[0])
            with dst.store() as store:
                target_counts = store.counts()
            vectors = {"store": expected, "source": src.vector_count(), "target": dst.vector_count()}
        if target_counts != counts or vectors["target"] != expected:
            raise MigrationMismatch(f"counts differ after migrating {name!r}: store {counts} -> {target_counts}, "
                                    f"level-1 entries {vectors}")
        qs = sample_queries(src, queries)
        same = [[(h.doc_id, h.chunk_id) for h in a] == [(h.doc_id, h.chunk_id) for h in b]
                for a, b in zip(src.search_many(qs, 5), dst.search_many(qs, 5))]
        agreement = float(np.mean(same)) if same else 1.0
        out = {"kb": name, "from": level1_place(source, name)[0], "to": level1_place(target, name)[0],
               "source": counts, "target": target_counts, "vectors": vectors, "generation": info["generation"],
               "queries": len(qs), "same_top5": round(agreement, 4)}
        if agreement < min_agreement:
            raise MigrationMismatch(f"the migrated KB agrees on the top 5 of {agreement:.1%} of {len(qs)} sampled "
                                    f"queries, under {min_agreement:.0%}: {out}")
        return out
    except BaseException:
        if made_collections:
            KnowledgeBase(target, name).milvus().drop()
        if copied:
            shutil.rmtree(target.kb_dir(name), ignore_errors=True)
        raise
