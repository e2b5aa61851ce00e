"""SQLite helpers shared by every floor."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence

MAX_IN_VARS = 900
"""Values bound in one `IN (...)` list: below SQLite's oldest variable limit (999)."""


def in_batches(conn: sqlite3.Connection, sql: str, values: Sequence, params: Sequence = (),
               size: int = MAX_IN_VARS) -> Iterator:
    """The rows of `sql` over all of `values`, `size` at a time: `sql` holds one `{}` where the
    `?` list of its `IN (...)` goes; `params` are bound before each batch's values."""
    for i in range(0, len(values), size):
        part = list(values[i : i + size])
        yield from conn.execute(sql.format(",".join("?" * len(part))), [*params, *part])
