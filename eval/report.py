"""Self-contained HTML reports (tables and matplotlib plots inlined), with a JSON beside them."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def html_table(rows: list[dict], cols: list[str] | None = None) -> str:
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
    return f"<img src='data:image/png;base64,{b64}'/>"
