"""JSON Lines input with problems reported by line, shared by question and training-data files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from kb.fsutil import replacing_file, umask_mode


def read_jsonl(path: str | Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, object) pairs and problems (bad JSON, not an object), each naming its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    rows, problems = [], []
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path.name}:{n}: skipped (invalid JSON: {e.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path.name}:{n}: skipped (not a JSON object)")
                continue
            rows.append((n, obj))
    return rows, problems


def by_line(problems: list[str]) -> list[str]:
    """Problems ("file:LINE: ...") in line order."""
    return sorted(problems, key=lambda p: int(p.split(":")[1]) if p.split(":")[1].isdigit() else 0)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows to `path` atomically (a temporary file renamed into place); returns the count."""
    n = 0
    with replacing_file(Path(path), mode=umask_mode(0o666)) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n
