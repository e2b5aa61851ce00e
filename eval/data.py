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
        out.append(Question(str(row.get("id", n)), str(row["question"]).strip(),
                            [str(a) for a in answers if str(a).strip()], row.get("context")))
    return out, by_line(problems)
