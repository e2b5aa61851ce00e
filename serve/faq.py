"""FAQ entries answered directly: import, storage and matching.

`kb faq import FILE --kb NAME` reads question/answer[/stage] rows (CSV, TSV, XLSX, JSONL; headers in
English or Chinese), reports bad rows by line and stores the rest in the KB's store (`faq` table)
with their question and answer vectors. An entry's id is a hash of its normalised question, so
importing the same file again changes nothing.

`FaqMatcher` finds, for a question, the nearest FAQ questions by the embedder (both sides embedded as
queries: a symmetric task) and, when a reranker is in use, scores those candidates with the
cross-encoder. A match at or above the threshold (`faq.threshold` for the embedder's cosine,
`faq.rerank_threshold` for the reranker's score) is answered with the FAQ's answer, without
retrieval or an LLM call (serve/chain.py). An entry with a stage matches only questions of that
stage; one without a stage matches every question.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kb.settings import FaqConfig, Settings
from retrieval.search import Hit
from serve.compliance import SIMILARITY_KIND, ApprovedReply

QUESTION_KEYS = ("question", "q", "问题", "问", "标准问题", "问句")
ANSWER_KEYS = ("answer", "a", "答案", "答", "回答", "回复", "标准答案")
STAGE_KEYS = ("stage", "阶段", "对话阶段")
MAX_QUESTION_CHARS = 1000
MAX_ANSWER_CHARS = 20_000
MAX_STAGE_CHARS = 64
SUFFIXES = (".csv", ".tsv", ".xlsx", ".jsonl")


class FaqFileError(ValueError):
    """The FAQ file as a whole cannot be read (missing, unsupported type, no question/answer header)."""


@dataclass
class FaqRow:
    line: int
    question: str
    answer: str
    stage: str = ""


@dataclass
class FaqEntry:
    faq_id: str
    question: str
    answer: str
    stage: str = ""

    def source(self) -> str:
        return f"FAQ #{self.faq_id}: {self.question}"

    def to_hit(self, score: float) -> Hit:
        """The entry as a retrieval hit, so an FAQ answer cites it like a passage."""
        return Hit(chunk_id=None, doc_id=f"faq:{self.faq_id}", source=self.source(), text=self.answer,
                   key_info={"faq_id": self.faq_id, "question": self.question, "stage": self.stage},
                   score=score, level="faq")

    def to_json(self) -> dict:
        return {"id": self.faq_id, "question": self.question, "answer": self.answer, "stage": self.stage or None}


@dataclass
class FaqMatch:
    entry: FaqEntry
    score: float
    """The score compared with the threshold: the reranker's when one is used, else the cosine."""
    embed_score: float
    rerank_score: float | None = None


# ids and file reading ------------------------------------------------------------------------------
def normalise_question(text: str) -> str:
    """NFKC, lower case, whitespace collapsed, trailing punctuation dropped: what the id hashes."""
    t = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()
    return re.sub(r"[\s?？!！.。]+$", "", t)


def faq_id(question: str, stage: str | None = None) -> str:
    """The entry id of `question` for `stage`: stable across imports, the same for trivially
    different spellings; the same question may have one answer per stage."""
    key = normalise_question(question) + (f"\x1f{stage}" if stage else "")
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def read_faq_file(path: str | Path) -> tuple[list[FaqRow], list[dict]]:
    """The good rows of an FAQ file and the bad ones as `{"line", "error"}` (line numbers as a
    person sees them: the header is line 1 of a CSV/XLSX). FaqFileError when the file as a whole
    is unusable."""
    p = Path(path)
    if not p.is_file():
        raise FaqFileError(f"no such file: {p}")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise FaqFileError(f"{p.name}: unsupported FAQ file type {suffix or '(none)'}; "
                           f"use one of {', '.join(SUFFIXES)}")
    if suffix == ".jsonl":
        return rows_from_jsonl(p)
    records = xlsx_records(p) if suffix == ".xlsx" else csv_records(p, "\t" if suffix == ".tsv" else ",")
    return rows_from_table(records, p.name)


def read_text(path: Path) -> str:
    """The file's text: UTF-8 (with or without BOM), else GB18030 (Chinese Excel exports)."""
    data = path.read_bytes()
    for enc in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    raise FaqFileError(f"{path.name}: neither UTF-8 nor GB18030 text")


def csv_records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) of each CSV record (a quoted cell may span lines)."""
    reader = csv.reader(read_text(path).splitlines(keepends=True), delimiter=delimiter)
    start = 1
    try:
        for cells in reader:
            yield start, cells
            start = reader.line_num + 1
    except csv.Error as e:
        raise FaqFileError(f"{path.name}: line {reader.line_num}: {e}") from e


def xlsx_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(row number, cells as text) of the first sheet of a workbook."""
    import openpyxl

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # noqa: BLE001 - openpyxl raises many kinds for a bad workbook
        raise FaqFileError(f"{path.name}: not a readable XLSX workbook ({type(e).__name__}: {e})") from e
    try:
        for i, row in enumerate(wb.worksheets[0].iter_rows(values_only=True), start=1):
            yield i, ["" if v is None else str(v) for v in row]
    finally:
        wb.close()


def column_of(header: list[str], keys: tuple[str, ...]) -> int | None:
    """The column of the first of `keys` that the header names (case-insensitive); None without any."""
    names = [h.strip().lower() for h in header]
    return next((names.index(k) for k in keys if k in names), None)


def rows_from_table(records: Iterator[tuple[int, list[str]]], name: str) -> tuple[list[FaqRow], list[dict]]:
    """Rows of a table whose first non-empty record is the header (question/问题, answer/答案, stage/阶段)."""
    header, cols = None, (None, None, None)
    rows, failed = [], []
    for line, cells in records:
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = cells
            cols = (column_of(cells, QUESTION_KEYS), column_of(cells, ANSWER_KEYS), column_of(cells, STAGE_KEYS))
            if cols[0] is None or cols[1] is None:
                raise FaqFileError(f"{name}: line {line}: the header must name a question and an answer column "
                                   f"(question/问题, answer/答案, optional stage/阶段); it has {cells}")
            continue
        cell = lambda i, cells=cells: cells[i] if i is not None and i < len(cells) else ""  # noqa: E731
        checked = check_row(line, cell(cols[0]), cell(cols[1]), cell(cols[2]))
        (failed if isinstance(checked, dict) else rows).append(checked)
    if header is None:
        raise FaqFileError(f"{name}: the file is empty")
    return rows, failed


def rows_from_jsonl(path: Path) -> tuple[list[FaqRow], list[dict]]:
    """Rows of a JSONL file: one object per line with question/answer[/stage] (or 问题/答案/阶段)."""
    rows, failed = [], []
    for line, text in enumerate(read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            failed.append({"line": line, "error": f"not JSON: {e}"})
            continue
        if not isinstance(obj, dict):
            failed.append({"line": line, "error": "not a JSON object"})
            continue
        get = lambda keys, obj=obj: next((obj[k] for k in keys if k in obj), "")  # noqa: E731
        q, a, s = get(QUESTION_KEYS), get(ANSWER_KEYS), get(STAGE_KEYS)
        if not all(isinstance(v, str) or v is None for v in (q, a, s)):
            failed.append({"line": line, "error": "question, answer and stage must be strings"})
            continue
        checked = check_row(line, q or "", a or "", s or "")
        (failed if isinstance(checked, dict) else rows).append(checked)
    return rows, failed


def check_row(line: int, question: str, answer: str, stage: str) -> FaqRow | dict:
    """The row, or `{"line", "error"}` saying what is wrong with it."""
    q, a, s = question.strip(), answer.strip(), stage.strip()
    if s == "*":
        s = ""
    problem = ("empty question" if not q else "empty answer" if not a
               else f"question longer than {MAX_QUESTION_CHARS} characters" if len(q) > MAX_QUESTION_CHARS
               else f"answer longer than {MAX_ANSWER_CHARS} characters" if len(a) > MAX_ANSWER_CHARS
               else f"stage longer than {MAX_STAGE_CHARS} characters" if len(s) > MAX_STAGE_CHARS else None)
    return {"line": line, "error": problem} if problem else FaqRow(line, q, a, s)


# storage -----------------------------------------------------------------------------------------
def import_faq(kb, path: str | Path) -> dict:
    """Import an FAQ file into knowledge base `kb` (created when new), under its write lock; only
    new or changed entries are embedded and written. FaqFileError when the file is unusable."""
    rows, failed = read_faq_file(path)
    latest: dict[str, FaqRow] = {}
    duplicates = []
    for r in rows:
        fid = faq_id(r.question, r.stage)
        if fid in latest:
            duplicates.append({"line": latest[fid].line, "same_question_as_line": r.line})
        latest[fid] = r
    with kb.writing(create=True), kb.store(create=True) as store:
        old = {e["faq_id"]: e for e in store.faq_entries()}
        emb = kb.embedder
        model_id = emb.cache_id(SIMILARITY_KIND)
        todo = [(fid, r) for fid, r in latest.items() if not unchanged(old.get(fid), r, model_id)]
        vq = emb.encode([r.question for _, r in todo], SIMILARITY_KIND)
        va = emb.encode([r.answer for _, r in todo], SIMILARITY_KIND)
        store.put_faq([{"faq_id": fid, "question": r.question, "answer": r.answer, "stage": r.stage,
                        "model_id": model_id, "q_vec": vq[i].tobytes(), "a_vec": va[i].tobytes()}
                       for i, (fid, r) in enumerate(todo)])
        total = len(store.faq_entries())
    added = sum(fid not in old for fid, _ in todo)
    return {"kb": kb.name, "file": str(path), "rows": len(rows) + len(failed), "imported": len(rows),
            "added": added, "updated": len(todo) - added, "unchanged": len(latest) - len(todo),
            "failed": failed, "duplicates": duplicates, "entries": total}


def unchanged(stored: dict | None, row: FaqRow, model_id: str) -> bool:
    """Whether the stored FAQ entry has this row's question, answer and stage and was embedded with `model_id`."""
    return (stored is not None and stored["question"] == row.question and stored["answer"] == row.answer
            and stored["stage"] == row.stage and stored["model_id"] == model_id)


def list_faq(kb) -> list[FaqEntry]:
    """The knowledge base's FAQ entries."""
    with kb.store() as store:
        return [FaqEntry(e["faq_id"], e["question"], e["answer"], e["stage"]) for e in store.faq_entries()]


def remove_faq(kb, ids: list[str] | None) -> int:
    """Delete FAQ entries by id (None: all) under the KB's write lock; how many were deleted."""
    with kb.writing(), kb.store() as store:
        return store.delete_faq(ids)


# matching ----------------------------------------------------------------------------------------
class FaqMatcher:
    """The FAQ of one moment: its entries and question vectors, the embedder and optional reranker."""

    def __init__(self, cfg: FaqConfig, embedder, entries: list[FaqEntry], vectors: np.ndarray | None = None,
                 reranker=None) -> None:
        """`vectors`: the entries' questions embedded as SIMILARITY_KIND (computed when None);
        `reranker`: a `retrieval.search.Reranker` (its cross-encoder scores the candidates)."""
        self.cfg = cfg
        self.embedder = embedder
        self.entries = entries
        self.reranker = reranker
        self.vectors = vectors if vectors is not None else embedder.encode([e.question for e in entries],
                                                                           SIMILARITY_KIND)

    @property
    def threshold(self) -> float:
        return self.cfg.rerank_threshold if self.reranker is not None else self.cfg.threshold

    def scored(self, question: str, stage: str | None = None) -> list[FaqMatch]:
        """The `cfg.candidates` nearest entries that may answer at `stage`, best first."""
        return self.scored_many([question], stage)[0]

    def scored_many(self, questions: list[str], stage: str | None = None) -> list[list[FaqMatch]]:
        """`scored` for many questions: one embedding batch and one reranker batch."""
        allowed = [i for i, e in enumerate(self.entries) if not e.stage or e.stage == stage]
        out: list[list[FaqMatch]] = [[] for _ in questions]
        todo = [k for k, q in enumerate(questions) if q.strip()]
        if not allowed or not todo:
            return out
        sims = self.embedder.encode([questions[k] for k in todo], SIMILARITY_KIND) @ self.vectors[allowed].T
        for row, k in zip(sims, todo):
            top = np.argsort(-row)[: max(1, self.cfg.candidates)]
            out[k] = [FaqMatch(self.entries[allowed[i]], float(row[i]), float(row[i])) for i in top]
        if self.reranker is not None:
            pairs = [(questions[k], m.entry.question) for k in todo for m in out[k]]
            scores = iter(self.reranker.scores(pairs))
            for k in todo:
                for m in out[k]:
                    m.rerank_score = m.score = float(next(scores))
                out[k].sort(key=lambda m: -m.score)
        return out

    def match(self, question: str, stage: str | None = None) -> FaqMatch | None:
        """The best entry when its score reaches the threshold, else None."""
        best = next(iter(self.scored(question, stage)), None)
        return best if best is not None and best.score >= self.threshold else None


def vectors_of(rows: list[dict], key: str, texts: list[str], embedder, model_id: str) -> np.ndarray:
    """The cached vectors `key` of `rows`, re-embedding those another embedder made."""
    out = np.zeros((len(rows), embedder.dim), dtype=np.float32)
    stale = [i for i, r in enumerate(rows) if r["model_id"] != model_id or r[key] is None]
    for i, r in enumerate(rows):
        if i not in stale:
            out[i] = np.frombuffer(r[key], dtype=np.float32)
    if stale:
        out[stale] = embedder.encode([texts[i] for i in stale], SIMILARITY_KIND)
    return out


class KbFaq:
    """The FAQ of a knowledge base for a long-lived answer chain: reloaded when the store's FAQ
    revision changes (an import or removal by any process)."""

    def __init__(self, settings: Settings, kb) -> None:
        self.settings = settings
        self.kb = kb
        self._lock = threading.Lock()
        self._revision: int | None = None
        self.matcher: FaqMatcher | None = None
        self.replies: list[ApprovedReply] = []
        self.answer_vectors = np.zeros((0, 0), dtype=np.float32)

    def reranker(self):
        m, cfg = self.settings.models, self.settings.faq
        if not (cfg.use_reranker and m.reranker):
            return None
        from retrieval.knowledge_base import shared_reranker

        return shared_reranker(m.reranker, m.device)

    def refresh(self) -> bool:
        """Reload when the FAQ changed; True when it did (the chain then rebuilds its reply library)."""
        with self.kb.store() as store:
            rev = store.faq_revision()
            if rev == self._revision:
                return False
            rows = store.faq_entries()
        with self._lock:
            if rev == self._revision:
                return False
            emb = self.kb.embedder
            model_id = emb.cache_id(SIMILARITY_KIND)
            entries = [FaqEntry(r["faq_id"], r["question"], r["answer"], r["stage"]) for r in rows]
            qv = vectors_of(rows, "q_vec", [e.question for e in entries], emb, model_id)
            self.answer_vectors = vectors_of(rows, "a_vec", [e.answer for e in entries], emb, model_id)
            self.matcher = FaqMatcher(self.settings.faq, emb, entries, qv, self.reranker()) if entries else None
            self.replies = [ApprovedReply(e.answer, "faq", e.stage or "*") for e in entries]
            self._revision = rev
            return True

    def match(self, question: str, stage: str | None = None) -> FaqMatch | None:
        matcher = self.matcher
        return matcher.match(question, stage) if matcher is not None else None
