"""Tables that keep their headers: a table model, readers (CSV/TSV, XLSX, HTML) and row-wise units.

A table is header rows plus body rows of display strings. Its column names join the header rows
top-down ("North / Price"). Retrieval sees a big table as one unit per row (or per
`rows_per_unit` rows) written "Product: Apple; North / Price: 3", so a question about one row
finds a unit holding that row and the names of its columns; a table whose grid text is at most
`whole_chars` stays one unit.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MAX_HEADER_ROWS = 4
MAX_TITLE_CHARS = 200
"""A sheet's leading single-value rows become its title only up to this length (what the
chunker keeps of a title in the title path); the rows after stay in the table."""
_WS = re.compile(r"[\s\x00-\x1f\x7f]+")


@dataclass
class Table:
    """Header rows and body rows of cell texts (all rows as wide as the table) and a title
    (caption or the heading above the table; a sheet's name goes into a title block before it)."""

    header: list[list[str]] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    title: str = ""

    @property
    def columns(self) -> list[str]:
        """One name per column: the header rows' distinct texts top-down, joined by " / "."""
        width = max((len(r) for r in self.header + self.rows), default=0)
        names: list[str] = []
        for j in range(width):
            parts: list[str] = []
            for row in self.header:
                cell = row[j] if j < len(row) else ""
                if cell and cell not in parts:
                    parts.append(cell)
            names.append(" / ".join(parts))
        return names

    @property
    def text(self) -> str:
        """The grid: a line of column names (when there is a header), then one line per row,
        cells joined by " | "."""
        lines = [" | ".join(self.columns)] if self.header else []
        lines += [" | ".join(r) for r in self.rows]
        return "\n".join(lines)

    def map_cells(self, fn: Callable[[str], str]) -> Table:
        """A copy with `fn` applied to every cell and to the title."""
        return Table([[fn(c) for c in r] for r in self.header], [[fn(c) for c in r] for r in self.rows],
                     fn(self.title) if self.title else "")


def _clean(cell: Any) -> str:
    return _WS.sub(" ", str(cell)).strip() if cell is not None else ""


def compact(grid: list[list[str]]) -> list[list[str]]:
    """`grid` padded to one width, without empty rows and empty columns."""
    rows = [r for r in grid if any(c for c in r)]
    width = max((len(r) for r in rows), default=0)
    rows = [r + [""] * (width - len(r)) for r in rows]
    keep = [j for j in range(width) if any(r[j] for r in rows)]
    return [[r[j] for j in keep] for r in rows]


def from_grid(grid: list[list[str]], header_rows: int = 1, title: str = "") -> Table:
    """A table of `grid` (compacted) whose first `header_rows` rows are the header (none when the
    grid has a single row)."""
    rows = compact(grid)
    h = min(header_rows, len(rows) - 1) if len(rows) > 1 else 0
    return Table(rows[:h], rows[h:], title)


def read_delimited(text: str, delimiter: str = ",") -> Table:
    """A CSV/TSV text as a table; its first row is the header."""
    grid = [[_clean(c) for c in r] for r in csv.reader(io.StringIO(text), delimiter=delimiter)]
    return from_grid(grid, 1)


# ---------------------------------------------------------------- XLSX

_QUOTED = re.compile(r'"([^"]*)"')
_LOCALE_SYMBOL = re.compile(r"\[\$([^\]-]*)(?:-[^\]]*)?\]")
_BRACKETS = re.compile(r"\[[^\]]*\]")


def format_number(value: float | int, number_format: str | None) -> str:
    """`value` about as Excel displays it under `number_format`: decimals, thousands separators,
    percent, currency symbols and literal text; "General" drops a float's trailing ".0"."""
    fmt = (number_format or "General").split(";")[0]
    if fmt in {"General", "@", ""}:
        return str(int(value)) if float(value).is_integer() else f"{value:.15g}"
    symbols = "".join(m.group(1) for m in _LOCALE_SYMBOL.finditer(fmt))
    bare = _BRACKETS.sub("", _LOCALE_SYMBOL.sub("", fmt))
    literals = _QUOTED.findall(bare)
    bare = _QUOTED.sub("", bare).replace("\\", "")
    digits = re.search(r"[0#?][0#?,.]*", bare)
    if digits is None:
        return str(int(value)) if float(value).is_integer() else f"{value:.15g}"
    pattern = digits.group(0)
    decimals = len(pattern.split(".", 1)[1].rstrip(",")) if "." in pattern else 0
    number = value * 100 if "%" in bare else value
    body = f"{number:,.{decimals}f}" if "," in pattern.split(".")[0] else f"{number:.{decimals}f}"
    before = bare[: digits.start()].replace("_", "").replace("*", "").strip(" ()")
    after = bare[digits.end():].replace("_", "").replace("*", "").strip(" ()")
    prefix = symbols + before + (literals[0] if literals and fmt.find('"') < fmt.find(pattern) else "")
    suffix = after + (literals[-1] if literals and fmt.rfind('"') > fmt.find(pattern) else "")
    return f"{prefix}{body}{suffix}".strip()


def cell_text(cell: Any) -> tuple[str, bool]:
    """(display text, is a number) of an openpyxl cell."""
    v = cell.value
    if v is None:
        return "", False
    if isinstance(v, bool):
        return ("TRUE" if v else "FALSE"), False
    if isinstance(v, (int, float)):
        return format_number(v, cell.number_format), True
    if isinstance(v, dt.datetime):
        if v.time() == dt.time():
            return v.date().isoformat(), True
        return v.isoformat(sep=" ", timespec="minutes"), True
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat(), True
    return _clean(v), False


@dataclass
class _Sheet:
    grid: list[list[str]]
    numeric: list[list[bool]]
    hmerged: set[tuple[int, int]]
    """(row, col) cells inside a merged range spanning several columns."""
    vmerged: set[tuple[int, int]]
    """(row, col) cells of a merged range spanning several rows, except its last row."""


def _value_bounds(ws: Any) -> tuple[int, int]:
    """(last row, last column) holding a value (merged ranges are cut there): a column formatted down to row
    1,048,576 must not make a grid that big (iterating the sheet's full dimension would create
    every cell), so the loaded cells are looked at, not `max_row`."""
    loaded = getattr(ws, "_cells", None)
    if not isinstance(loaded, dict):
        return ws.max_row or 0, ws.max_column or 0
    rows = [r for (r, c), cell in loaded.items() if cell.value is not None]
    cols = [c for (r, c), cell in loaded.items() if cell.value is not None]
    return max(rows, default=0), max(cols, default=0)


def _read_sheet(ws: Any) -> _Sheet:
    """A worksheet's displayed values with merged ranges filled by their top-left value, without
    empty rows and columns."""
    n_rows, n_cols = _value_bounds(ws)
    if not n_rows or not n_cols:
        return _Sheet([], [], set(), set())
    grid = [["" for _ in range(n_cols)] for _ in range(n_rows)]
    numeric = [[False] * n_cols for _ in range(n_rows)]
    for r, row in enumerate(ws.iter_rows(min_row=1, max_row=n_rows, max_col=n_cols)):
        for c, cell in enumerate(row):
            grid[r][c], numeric[r][c] = cell_text(cell)
    hm: set[tuple[int, int]] = set()
    vm: set[tuple[int, int]] = set()
    for rng in ws.merged_cells.ranges:
        r0, c0 = rng.min_row - 1, rng.min_col - 1
        r1, c1 = min(rng.max_row, n_rows) - 1, min(rng.max_col, n_cols) - 1
        if r0 >= n_rows or c0 >= n_cols:
            continue
        val, num = grid[r0][c0], numeric[r0][c0]
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                grid[r][c], numeric[r][c] = val, num
                if c1 > c0:
                    hm.add((r, c))
                if r < r1:
                    vm.add((r, c))
    keep_r = [r for r in range(n_rows) if any(grid[r])]
    keep_c = [c for c in range(n_cols) if any(grid[r][c] for r in keep_r)]
    rmap = {r: i for i, r in enumerate(keep_r)}
    cmap = {c: j for j, c in enumerate(keep_c)}
    return _Sheet([[grid[r][c] for c in keep_c] for r in keep_r],
                  [[numeric[r][c] for c in keep_c] for r in keep_r],
                  {(rmap[r], cmap[c]) for r, c in hm if r in rmap and c in cmap},
                  {(rmap[r], cmap[c]) for r, c in vm if r in rmap and c in cmap})


def _header_rows(s: _Sheet, top: int) -> int:
    """How many rows from `top` form the header: the first row, and each next row while the row
    above groups columns (a horizontally merged cell, a blank cell under-filled by the row below)
    or a vertically merged cell reaches down into it, and it holds no numbers."""
    n = len(s.grid)
    width = len(s.grid[0]) if s.grid else 0
    h = 1
    while h < MAX_HEADER_ROWS and top + h < n - 1:
        above, row = top + h - 1, top + h
        if any(s.numeric[row]) or any(s.numeric[above]):
            break
        grouped = any((above, c) in s.hmerged for c in range(width))
        spans_down = any((above, c) in s.vmerged for c in range(width))
        gaps = ("" in s.grid[above] and all(s.grid[row]) and any(s.numeric[row + 1]))
        if not (grouped or spans_down or gaps):
            break
        h += 1
    return h


def _below(s: _Sheet, top: int) -> _Sheet:
    """The rows of `s` from `top` on, without the columns that are empty there."""
    keep = [c for c in range(len(s.grid[0])) if any(r[c] for r in s.grid[top:])]
    cmap = {c: j for j, c in enumerate(keep)}

    def cells(found: set[tuple[int, int]]) -> set[tuple[int, int]]:
        return {(r - top, cmap[c]) for r, c in found if r >= top and c in cmap}

    return _Sheet([[r[c] for c in keep] for r in s.grid[top:]],
                  [[r[c] for c in keep] for r in s.numeric[top:]], cells(s.hmerged), cells(s.vmerged))


def sheet_table(ws: Any) -> Table | None:
    """The table of one worksheet (None when it is empty): leading rows holding one distinct value
    (a merged title across the sheet) become its title, then the header rows are detected."""
    s = _read_sheet(ws)
    if not s.grid:
        return None
    width = len(s.grid[0])
    top, titles = 0, []
    while width > 1 and top < len(s.grid) - 1 and len({c for c in s.grid[top] if c}) == 1:
        title = next(c for c in s.grid[top] if c)
        if len(" / ".join(titles + [title])) > MAX_TITLE_CHARS:
            break  # longer than a title path keeps: body text, not a title
        titles.append(title)
        top += 1
    s, top = _below(s, top), 0
    width = len(s.grid[0])
    if len(s.grid) == 1:
        return Table([], [s.grid[0]], " / ".join(titles))
    h = _header_rows(s, top)
    header = [list(r) for r in s.grid[top : top + h]]
    for r in range(len(header) - 1):  # an unmerged group name covers the blank cells after it
        for c in range(1, width):
            if not header[r][c] and header[r][c - 1] and header[r + 1][c]:
                header[r][c] = header[r][c - 1]
    return Table(header, [list(r) for r in s.grid[top + h :]], " / ".join(titles))


def read_xlsx(path: str | Path) -> list[tuple[str, Table]]:
    """(sheet name, table) for every non-empty worksheet of an XLSX file, cached formula results
    shown (a formula never calculated shows nothing)."""
    import openpyxl

    wb = openpyxl.load_workbook(str(path), data_only=True)
    try:
        out = []
        for ws in wb.worksheets:
            t = sheet_table(ws)
            if t is not None and (t.rows or t.header):
                out.append((ws.title, t))
        return out
    finally:
        wb.close()


@dataclass
class TableElement:
    """A parsed element (the shape loaders' `_to_block` reads) that carries its Table."""

    category: str
    text: str
    table: Table | None = None
    metadata: Any = None


def xlsx_elements(path: str | Path) -> list[TableElement]:
    """A title element (the sheet name) and a table element per worksheet, page = sheet number."""
    out: list[TableElement] = []
    for page, (name, table) in enumerate(read_xlsx(path), 1):
        md = SimpleNamespace(page_number=page, category_depth=0, text_as_html=None)
        out.append(TableElement("Title", name, None, md))
        if table.title == name:
            table.title = ""
        out.append(TableElement("Table", table.text, table, md))
    return out


# ---------------------------------------------------------------- HTML

def html_tables(html: str) -> list[Table]:
    """Every outermost <table> of `html`, rowspan/colspan expanded (the spanned value repeated),
    <thead> rows or leading all-<th> rows as the header (else the first row), <caption> as title."""
    import lxml.html

    try:
        root = lxml.html.fromstring(html)
    except Exception:  # noqa: BLE001 - lxml raises on empty or odd documents
        return []
    tables = [root] if root.tag == "table" else root.iter("table")
    return [_html_table(t) for t in tables if not _inside_table(t)]


def _inside_table(el: Any) -> bool:
    return any(a.tag == "table" for a in el.iterancestors())


def _own_rows(table: Any) -> Iterable[tuple[Any, bool]]:
    """(tr, in thead) of `table` itself, not of tables nested in its cells."""
    for tr in table.iter("tr"):
        owner = next(a for a in tr.iterancestors() if a.tag == "table")
        if owner is table:
            yield tr, any(a.tag == "thead" for a in tr.iterancestors() if a is not table)


def _span(cell: Any, name: str) -> int:
    try:
        return max(1, min(int(cell.get(name, "1")), 1000))
    except ValueError:
        return 1


def _html_table(table: Any) -> Table:
    trs = list(_own_rows(table))
    cells: dict[tuple[int, int], str] = {}
    is_head: list[bool] = []
    for r, (tr, in_thead) in enumerate(trs):
        tds = [c for c in tr if c.tag in {"td", "th"}]
        is_head.append(in_thead or (bool(tds) and all(c.tag == "th" for c in tds)))
        c = 0
        for cell in tds:
            while (r, c) in cells:
                c += 1
            text = _clean(cell.text_content())
            rs, cs = min(_span(cell, "rowspan"), len(trs) - r), _span(cell, "colspan")
            for dr in range(rs):
                for dc in range(cs):
                    cells.setdefault((r + dr, c + dc), text)
            c += cs
    width = max((c for _, c in cells), default=-1) + 1
    grid = [[cells.get((r, c), "") for c in range(width)] for r in range(len(trs))]
    caption = table.find("caption")
    title = _clean(caption.text_content()) if caption is not None else ""
    h = 0
    while h < min(len(grid) - 1, MAX_HEADER_ROWS) and is_head[h]:
        h += 1
    head, body = compact_split(grid, h or 1)
    return Table(head, body, title)


def compact_split(grid: list[list[str]], h: int) -> tuple[list[list[str]], list[list[str]]]:
    """Header and body of `grid` whose first `h` rows are the header, empty rows and columns
    dropped (a one-row grid has no header)."""
    keep = [j for j in range(len(grid[0]) if grid else 0) if any(r[j] for r in grid)]
    rows = [[r[j] for j in keep] for r in grid]
    head = [r for r in rows[:h] if any(r)] if len(rows) > 1 else []
    body = [r for r in rows[h:] if any(r)] if len(rows) > 1 else [r for r in rows if any(r)]
    return head, body


# ---------------------------------------------------------------- units

def render_row(columns: list[str], row: list[str]) -> str:
    """One row as "Name: value; Name: value" (empty cells left out; a nameless column gives
    its value alone)."""
    parts = []
    for name, value in zip(columns, row):
        if value:
            parts.append(f"{name}: {value}" if name and name != value else value)
    return "; ".join(parts)


def table_units(table: Table, max_chars: int, whole_chars: int, rows_per_unit: int = 1) -> list[str]:
    """The texts retrieval sees for a table: the whole grid when it is at most `whole_chars`
    long, else its rows rendered with their column names, `rows_per_unit` rows per unit (fewer
    when the unit would pass `max_chars`); a row longer than `max_chars` is cut between cells,
    each piece starting with the row's first cell."""
    grid = table.text
    if len(grid) <= whole_chars or not table.rows:
        return [grid]
    columns = table.columns or [""] * len(table.rows[0])
    units: list[str] = []
    cur: list[str] = []
    for row in table.rows:
        for line in _row_pieces(columns, row, max_chars):
            if cur and (len(cur) >= max(rows_per_unit, 1) or len("\n".join(cur)) + 1 + len(line) > max_chars):
                units.append("\n".join(cur))
                cur = []
            cur.append(line)
    if cur:
        units.append("\n".join(cur))
    return units


def _row_pieces(columns: list[str], row: list[str], max_chars: int) -> list[str]:
    text = render_row(columns, row)
    if len(text) <= max_chars:
        return [text]
    key = render_row(columns[:1], row[:1])
    pieces: list[str] = []
    cur = key
    for name, value in list(zip(columns, row))[1:]:
        part = render_row([name], [value])
        if not part:
            continue
        if cur and len(cur) + 2 + len(part) > max_chars and cur != key:
            pieces.append(cur)
            cur = key
        cur = f"{cur}; {part}" if cur else part
        while len(cur) > max_chars:
            pieces.append(cur[:max_chars])
            cur = cur[max_chars:]
    if cur and cur != key:
        pieces.append(cur)
    # a row whose text is all in its first cell: cut it, never truncate it
    return pieces or [text[i:i + max_chars] for i in range(0, len(text), max_chars)]


def attach_html_tables(elements: list[Any], html: str) -> list[Any]:
    """`elements` (unstructured's, from `html`) with the tables read from the source HTML set as
    the `table` of its Table elements, in order, when the counts agree (unstructured's own
    text_as_html drops rowspan and colspan)."""
    found = html_tables(html)
    targets = [e for e in elements if getattr(e, "category", "") == "Table"]
    if len(found) == len(targets):
        for el, table in zip(targets, found):
            el.table = table
    return elements
