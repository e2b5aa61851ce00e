"""Self-contained HTML reports (tables and matplotlib plots inlined), with a JSON beside them."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path


def figure_png(fig) -> str:
    """The matplotlib figure as base64 PNG; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def html_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """An HTML table of `rows` (columns `cols`, default: the first row's keys; floats to 4 decimals)."""
    if not rows:
        return "<p>(none)</p>"
    cols = cols or list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: str | Path, title: str, sections: list[tuple[str, str]], payload: dict) -> Path:
    """Write `path` (HTML: sections of (heading, html)) and `path` with .json (the payload)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    css = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
           "text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>",
                    encoding="utf-8")
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
    return path


def img(b64: str) -> str:
    """An <img> tag showing a base64 PNG inline."""
    return f"<img src='data:image/png;base64,{b64}'/>"


def half_up(x: float, digits: int = 3) -> str:
    """`x` rounded half up (as the figure is written, not its binary value) to `digits` decimals;
    whole numbers with thousands separators."""
    from decimal import ROUND_HALF_UP, Decimal

    q = Decimal(repr(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{q:,}" if digits == 0 else f"{q}"


def data_digest(paths) -> str:
    """sha256 over the files under `paths` (folders walked in sorted order; names and bytes):
    the fingerprint of a data set."""
    import hashlib

    h = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in (f for f in files if f.is_file()):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def provenance(settings=None, data=()) -> dict:
    """What a result file needs to be reproduced: command, git commit (+ "dirty"), device, date,
    the resolved configuration and the sha256 of each data file or folder in `data`."""
    import platform
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " dirty"
    if os.environ.get("BENCH_SOURCE_COMMIT"):
        # a copy of the tree whose git metadata is not its own (the GPU machine's): the sender
        # names the commit it sent, and the copy's own reading is kept beside it
        commit = f"{os.environ['BENCH_SOURCE_COMMIT']} (sent; the copy's git read {commit})"
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001
        device = ""

    device = device or f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out = {"command": " ".join(sys.argv), "commit": commit, "device": device, "date": time.strftime("%Y-%m-%d %H:%M")}
    if settings is not None:
        out["config"] = settings.model_dump(mode="json")
    if data:
        out["data_sha256"] = {str(p): data_digest([p]) for p in data if p and Path(p).exists()}
    return out
