"""Long, multi-topic documents built from a QA corpus, with each question's gold paragraph known.

Real company documents are long and cover several topics; the paragraphs of a SQuAD-style corpus
are short and cover one. `build_long_docs` joins paragraphs of different articles (each article's
paragraphs stay together, in order: one topic) into documents of `min_chars`-`max_chars`
characters (each document's target length drawn uniformly), and records where every paragraph
sits (`spans`: character offsets into the document's text). Paragraph breaks occur inside topics as
well as between them (a paragraph is cut into pieces of about `piece_chars` at sentence ends, never
inside a gold answer), so a break is no hint of a topic change.

    python -m eval.longdocs ../shared/data/cmrc2018/cmrc2018_trial.json data/cmrc_long \\
        --splits kb --questions data/cmrc_long.jsonl --ask kb,out
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from eval.data import SPLITS, Paragraph, squad_paragraphs

_SENT_END = re.compile(r"(?<=[。！？!?；])(?![”’」』）)])")


@dataclass
class LongDoc:
    name: str
    text: str
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)
    """paragraph index (Paragraph.index) -> (start, end) in `text`"""


def _pieces(p: Paragraph, piece_chars: int) -> list[str]:
    """The paragraph cut at sentence ends into pieces of about `piece_chars` (never inside an
    occurrence of one of its questions' answers)."""
    text = p.context
    inside = set()
    for q in p.questions:
        for a in q.answers:
            for m in re.finditer(re.escape(a), text):
                inside.update(range(m.start() + 1, m.end()))
    cuts = [m.start() for m in _SENT_END.finditer(text) if 0 < m.start() < len(text) and m.start() not in inside]
    out, start = [], 0
    for c in cuts:
        if c - start >= piece_chars and len(text) - c >= piece_chars // 2:
            out.append(text[start:c])
            start = c
    out.append(text[start:])
    return [x for x in out if x]


def build_long_docs(paragraphs: list[Paragraph], min_chars: int = 3000, max_chars: int = 20000,
                    seed: int = 13, piece_chars: int = 250, prefix: str = "long") -> list[LongDoc]:
    """Documents of several topics each; see the module docstring."""
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
    rng = random.Random(seed)
    topics: dict[int, list[Paragraph]] = {}
    for p in paragraphs:
        if p.context:
            topics.setdefault(p.article, []).append(p)
    order = list(topics.values())
    rng.shuffle(order)
    groups: list[list[list[Paragraph]]] = []
    target, size = 0, 0
    for topic in order:
        if not groups or size >= target:
            groups.append([])
            target, size = rng.randint(min_chars, max_chars), 0
        groups[-1].append(topic)
        size += sum(len(p.context) for p in topic)
    if len(groups) > 1 and sum(len(p.context) for t in groups[-1] for p in t) < min_chars:
        groups[-2].extend(groups.pop())
    return [_join(f"{prefix}-{i:03d}.txt", [p for t in g for p in t], piece_chars) for i, g in enumerate(groups)]


def _join(name: str, paras: list[Paragraph], piece_chars: int) -> LongDoc:
    doc = LongDoc(name, "")
    parts: list[str] = []
    pos = 0
    for p in paras:
        if parts:
            parts.append("\n\n")
            pos += 2
        body = "\n\n".join(_pieces(p, piece_chars))
        doc.spans[p.index] = (pos, pos + len(body))
        parts.append(body)
        pos += len(body)
    doc.text = "".join(parts) + "\n"
    return doc


def write_long_docs(squad: str | Path, out: str | Path, splits: tuple[str, ...] = ("kb",), *,
                    questions: str | Path | None = None, ask: tuple[str, ...] | None = None,
                    min_chars: int = 3000, max_chars: int = 20000, seed: int = 13) -> tuple[list[LongDoc], int]:
    """Write the documents of `splits` to `out` (one .txt each) and, with `questions`, the questions
    of `ask` (default `splits`) as JSONL with `doc`, `span` (of the gold paragraph, when it is in
    a document) and `in_kb`. Returns the documents and the number of questions written."""
    paras = squad_paragraphs(squad)
    docs = build_long_docs([p for p in paras if p.split in splits], min_chars, max_chars, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for d in docs:
        (out / d.name).write_text(d.text, encoding="utf-8")
    n = 0
    if questions is not None:
        where = {i: (d.name, span) for d in docs for i, span in d.spans.items()}
        rows = []
        for p in paras:
            if p.split not in (ask or splits):
                continue
            doc, span = where.get(p.index, (None, None))
            rows += [{"id": q.id, "question": q.question, "answers": q.answers, "context": p.context,
                      "split": p.split, "in_kb": doc is not None, "doc": doc, "span": span} for q in p.questions]
        Path(questions).parent.mkdir(parents=True, exist_ok=True)
        Path(questions).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        n = len(rows)
    return docs, n


def main(argv: list[str] | None = None) -> None:
    """Command line: write the long documents (and optionally their questions) from a SQuAD-format file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("squad")
    ap.add_argument("out", help="folder for the documents")
    ap.add_argument("--splits", default="kb", help="comma-separated splits whose paragraphs go in: train,kb,out")
    ap.add_argument("--questions", help="also write the questions as JSONL here")
    ap.add_argument("--ask", help="the splits whose questions to write (default: --splits); others get in_kb false")
    ap.add_argument("--min-chars", type=int, default=3000)
    ap.add_argument("--max-chars", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    ask = tuple(s for s in args.ask.split(",") if s) if args.ask else None
    if bad := [s for s in splits + (ask or ()) if s not in SPLITS]:
        ap.error(f"unknown split(s) {bad}: use {', '.join(SPLITS)}")
    docs, n = write_long_docs(args.squad, args.out, splits, questions=args.questions, ask=ask,
                              min_chars=args.min_chars, max_chars=args.max_chars, seed=args.seed)
    sizes = sorted(len(d.text) for d in docs)
    print(f"{len(docs)} documents ({sizes[0]:,}-{sizes[-1]:,} characters, "
          f"{sum(len(d.spans) for d in docs)} paragraphs) -> {args.out}")
    if args.questions:
        print(f"{n} questions -> {args.questions}")


if __name__ == "__main__":
    main()
