"""Fault injection: named checkpoints in the write path that kill the process on demand.

`point(name)` does nothing unless the environment variable `KB_FAULT` names that checkpoint;
then the process sends itself SIGKILL there, as `kill -9` or a power cut would stop it. With
`KB_FAULT=name:N` it dies at the Nth time the checkpoint is reached (e.g. after the second
document of a batch). The crash tests and `bench/crash.py` use it to prove that a knowledge base
recovers by itself from a kill at every step of a write.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS: tuple[str, ...] = (
    "store.after_commit",       # a document's transaction committed (between documents of a batch)
    "kb.before_sync",           # the store holds the batch, the index does not yet
    "kb.after_delete",          # a document deleted from the store, the index still names it
    "publish.temp_partial",     # the new generation's folder half written
    "publish.before_rename",    # the new generation written whole under its temporary name
    "publish.after_rename",     # the generation has its final name, CURRENT still names the old one
    "publish.pointer_written",  # CURRENT.tmp written, not yet renamed over CURRENT
    "publish.after_replace",    # CURRENT names the new generation, old ones not yet removed
    "publish.cleanup",          # one old generation removed, others left
)
"""Every checkpoint of the write path, in the order a write reaches them."""

_reached: Counter[str] = Counter()


def point(name: str) -> None:
    """Checkpoint `name`: die here by SIGKILL when `KB_FAULT` asks for it (see the module doc)."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    spec = os.environ.get("KB_FAULT")
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _reached[name] += 1
    if _reached[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
