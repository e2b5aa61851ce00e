"""Question files: SQuAD-style JSON or JSONL `{"question", "answers": [...], "context"?}`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kb.jsonl import by_line, read_jsonl


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]
    context: str | None = None
    meta: dict = field(default_factory=dict)


def load_questions(path: str | Path) -> tuple[list[Question], list[str]]:
    """Questions and the problems found (each names its line or item and why it was skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such question file: {path}")
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("{") and '"data"' in stripped[:2000]:
        return _squad(json.loads(text), path)
    return _jsonl(path)


def _squad(data: dict, path: Path) -> tuple[list[Question], list[str]]:
    out, problems = [], []
    for a, art in enumerate(data.get("data", [])):
        for p, para in enumerate(art.get("paragraphs", [])):
            ctx = para.get("context")
            for q, qa in enumerate(para.get("qas", [])):
                where = f"{path.name}: data[{a}].paragraphs[{p}].qas[{q}]"
                answers = [x.get("text", "").strip() for x in qa.get("answers", []) if isinstance(x, dict)]
                answers = [x for x in dict.fromkeys(answers) if x]
                if not qa.get("question") or not answers:
                    problems.append(f"{where}: skipped (missing question or answers)")
                    continue
                out.append(Question(str(qa.get("id", where)), qa["question"].strip(), answers, ctx,
                                    {"title": art.get("title", "")}))
    return out, problems


def _jsonl(path: Path) -> tuple[list[Question], list[str]]:
    rows, problems = read_jsonl(path)
    out = []
    for n, row in rows:
        answers = row.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        if not str(row.get("question", "")).strip() or not answers:
            problems.append(f"{path.name}:{n}: skipped (needs \"question\" and \"answers\")")
            continue
        meta = {k: v for k, v in row.items() if k not in ("id", "question", "answers", "context")}
        out.append(Question(str(row.get("id", n)), str(row["question"]).strip(),
                            [str(a) for a in answers if str(a).strip()], row.get("context"), meta))
    return out, by_line(problems)


SPLITS = ("train", "kb", "out")


def split_of(index: int) -> str:
    """The split of the paragraph at global position `index` of a SQuAD-style file (file order,
    all articles): 40% `train` (what the project's shipped models are trained on), 40% `kb` (the
    evaluation knowledge base: answerable questions), 20% `out` (questions about documents that
    are not in the knowledge base: unanswerable)."""
    r = index % 5
    return "train" if r in (0, 1) else "kb" if r in (2, 3) else "out"


@dataclass
class Paragraph:
    index: int
    article: int
    title: str
    context: str
    split: str
    questions: list[Question] = field(default_factory=list)


def squad_paragraphs(path: str | Path) -> list[Paragraph]:
    """Every paragraph of a SQuAD-style file with its questions and its split."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    out: list[Paragraph] = []
    for a, art in enumerate(data.get("data", [])):
        title = str(art.get("title", "")).strip()
        for para in art.get("paragraphs", []):
            i = len(out)
            qs = []
            for q, qa in enumerate(para.get("qas", [])):
                answers = [x.get("text", "").strip() for x in qa.get("answers", []) if isinstance(x, dict)]
                answers = [x for x in dict.fromkeys(answers) if x]
                if qa.get("question") and answers:
                    qs.append(Question(str(qa.get("id", f"{i}-{q}")), qa["question"].strip(), answers,
                                       para.get("context"), {"title": title, "paragraph": i}))
            out.append(Paragraph(i, a, title, str(para.get("context", "")).strip(), split_of(i), qs))
    return out


def cmrc_split(path: str | Path) -> dict[str, list[Paragraph]]:
    """The paragraphs of a SQuAD-style file grouped by split (see `split_of`)."""
    groups: dict[str, list[Paragraph]] = {s: [] for s in SPLITS}
    for p in squad_paragraphs(path):
        groups[p.split].append(p)
    return groups
