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
from retrieval.kb import KnowledgeBase

SKIP = {"index", ".lock"}
"""What is not copied between data folders: level 1 is rebuilt from the store (and the embedding
cache) by the target backend; the lock belongs to the folder."""


class MigrationMismatch(RuntimeError):
    """The migrated KB does not hold what the source holds, or does not answer as it does."""


def copy_kb_folder(src: Path, dest: Path) -> None:
    """Copy a KB folder (SQLite files through SQLite's backup, consistent while others read)
    beside `dest`, then rename it into place."""
    with building_dir(dest, mode=umask_mode(0o777)) as tmp:
        for item in src.iterdir():
            if item.name in SKIP:
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


def level1_home(settings: Settings) -> str:
    """Where a configuration keeps level 1: milvus, or faiss (auto and torch search FAISS files)."""
    return "milvus" if settings.retrieval.backend == "milvus" else "faiss"


def migrate_kb(source: Settings, target: Settings, name: str, queries: int = 100, min_agreement: float = 0.95,
               progress: bool = False) -> dict:
    """Make KB `name` of `source` available under `target` (its data folder and retrieval
    backend): the folder is copied when the data folders differ, level 1 is built by the target
    backend (vectors come from the embedding cache when the embedder is the same), then document,
    chunk, key-information and vector counts must match and the top 5 of `queries` sampled key
    texts must agree for `min_agreement` of them. The source is left as it was."""
    src = KnowledgeBase(source, name)
    if level1_home(source) == level1_home(target) and Path(source.home).resolve() == Path(target.home).resolve() \
            and source.milvus == target.milvus:
        raise ValueError("the source and target configurations put this KB in the same place")
    with src.writing():
        if Path(target.home).resolve() != Path(source.home).resolve():
            if target.kb_dir(name).exists():
                raise ValueError(f"knowledge base {name!r} already exists under {target.home}")
            copy_kb_folder(src.dir, target.kb_dir(name))
        dst = KnowledgeBase(target, name)
        info = dst.sync(progress, rebuild=True)
        with src.store() as a, dst.store() as b:
            counts = {"source": a.counts(), "target": b.counts()}
        vectors = {"source": len(src._index().vectors) if src._index() else 0, "target": info["vectors"]}
    if counts["source"] != counts["target"] or vectors["source"] != vectors["target"]:
        raise MigrationMismatch(f"counts differ after migrating {name!r}: {counts}, vectors {vectors}")
    qs = sample_queries(src, queries)
    same = [[(h.doc_id, h.chunk_id) for h in a] == [(h.doc_id, h.chunk_id) for h in b]
            for a, b in zip(src.search_many(qs, 5), dst.search_many(qs, 5))]
    agreement = float(np.mean(same)) if same else 1.0
    out = {"kb": name, "from": level1_home(source), "to": level1_home(target), **counts,
           "vectors": vectors, "generation": info["generation"], "queries": len(qs),
           "same_top5": round(agreement, 4)}
    if agreement < min_agreement:
        raise MigrationMismatch(f"the migrated KB agrees on the top 5 of {agreement:.1%} of {len(qs)} sampled "
                                f"queries, under {min_agreement:.0%}: {out}")
    return out

