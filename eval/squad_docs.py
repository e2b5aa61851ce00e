"""Write the paragraphs of a SQuAD-style file as text documents, one file each, to build a KB,
and optionally their questions as JSONL; `--splits` keeps only some splits (`eval.data.split_of`).

    python -m eval.squad_docs ../shared/data/cmrc2018/cmrc2018_trial.json data/cmrc_docs
    python -m eval.squad_docs FILE data/cmrc_kb --splits kb --questions data/cmrc_kb.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.data import SPLITS, Paragraph, squad_paragraphs


def doc_names(paragraphs: list[Paragraph]) -> dict[int, str]:
    """Each paragraph's document name: `AAAA-PP.txt`, article and paragraph number."""
    seen: dict[int, int] = {}
    out = {}
    for p in paragraphs:
        out[p.index] = f"{p.article:04d}-{seen.get(p.article, 0):02d}.txt"
        seen[p.article] = seen.get(p.article, 0) + 1
    return out


def write_docs(squad: str | Path, out: str | Path, splits: tuple[str, ...] = SPLITS) -> int:
    """One text file per paragraph (`doc_names`; title first)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paras = squad_paragraphs(squad)
    names = doc_names(paras)
    n = 0
    for p in paras:
        if p.split not in splits:
            continue
        text = f"{p.title}\n\n{p.context}\n" if p.title else p.context + "\n"
        (out / names[p.index]).write_text(text, encoding="utf-8")
        n += 1
    return n


def write_questions(squad: str | Path, out: str | Path, splits: tuple[str, ...] = SPLITS,
                    in_kb: tuple[str, ...] | None = None) -> int:
    """JSONL `{"id", "question", "answers", "context", "split"}` of the questions in `splits`;
    with `in_kb` (the splits whose paragraphs the KB holds) each row also says `"in_kb"`, so
    `kb eval open` can tell false fallbacks from correct ones on unanswerable questions, and
    names its paragraph's document (`doc`, None when that is not in the KB)."""
    paras = squad_paragraphs(squad)
    names = doc_names(paras)
    rows = [{"id": q.id, "question": q.question, "answers": q.answers, "context": q.context, "split": p.split,
             **({"in_kb": p.split in in_kb, "doc": names[p.index] if p.split in in_kb else None}
                if in_kb is not None else {})}
            for p in paras if p.split in splits for q in p.questions]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line: write the documents (and optionally the questions) of the chosen SQuAD splits."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("squad")
    ap.add_argument("out", help="folder for the documents")
    ap.add_argument("--splits", default=",".join(SPLITS), help="comma-separated: train,kb,out")
    ap.add_argument("--questions", help="also write the questions of these splits as JSONL here")
    ap.add_argument("--ask", help="with --questions: the splits whose questions to write (default: --splits); "
                                  "rows of splits not in --splits get \"in_kb\": false (unanswerable)")
    args = ap.parse_args(argv)
    splits = tuple(s for s in args.splits.split(",") if s)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        ap.error(f"unknown split(s) {bad}: use {', '.join(SPLITS)}")
    print(f"{write_docs(args.squad, args.out, splits)} documents -> {args.out}")
    if args.questions:
        ask = tuple(s for s in (args.ask or args.splits).split(",") if s)
        n = write_questions(args.squad, args.questions, ask, in_kb=splits if args.ask else None)
        print(f"{n} questions -> {args.questions}")


if __name__ == "__main__":
    main()
