"""Ablation of the retrieval design: one factor changed at a time, the same embedder throughout.

Factors (the first level of each is the reference, `BASE`): chunking {NSP pair head, at its
tuned threshold, NSP cross-encoder, at its tuned threshold, fixed-size, fixed-size at the
reference's mean chunk length, one sentence per chunk}, index {two-level key information -> raw text,
single-level raw chunks}, search {hybrid, vector, BM25}, reranker {off, on}. Each row changes one
factor of the reference, so a difference between a row and the reference is that factor's.

Corpora, both from the same held-out paragraphs of a SQuAD-style file (`eval.data.split_of`):
`paragraphs` (each paragraph a document, as it is) and `long` (the paragraphs joined into long,
multi-topic documents, `eval.longdocs`). Every row is scored by `eval.retrieval` (recall, MRR,
nDCG, strict recall, context precision, the answer inside the LLM's character budget), and paired
against the reference per question (how many questions it gets right that the reference misses,
and the reverse). The KBs are built under `home` and reused when they are already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eval.data import Question, load_questions
from eval.report import data_digest
from kb.settings import Settings, apply_overrides, load_settings

log = logging.getLogger(__name__)

FACTORS: dict[str, dict[str, dict]] = {
    "chunking": {
        "nsp-pair": {"chunking.method": "nsp", "models.nsp": None, "nsp_train.kind": "pair_head"},
        "nsp-pair-tuned": {"chunking.method": "nsp", "models.nsp": None, "nsp_train.kind": "pair_head",
                           "chunking.threshold": "{eval.ablate_pair_threshold}"},
        "nsp-cross": {"chunking.method": "nsp", "models.nsp": "{eval.ablate_nsp}"},
        "nsp-cross-tuned": {"chunking.method": "nsp", "models.nsp": "{eval.ablate_nsp}",
                            "chunking.threshold": "{eval.ablate_cross_threshold}"},
        "fixed": {"chunking.method": "fixed"},
        "fixed-matched": {"chunking.method": "fixed", "chunking.fixed_size": "{reference.matched_fixed_size}",
                          "chunking.fixed_overlap": "{reference.matched_fixed_size/10}"},
        "sentence": {"chunking.method": "sentence"}},
    "index": {"two-level": {"retrieval.levels": ["article", "segment", "sentence"],
                            "retrieval.embed_field": "key_text"},
              "single-level": {"retrieval.levels": ["segment"], "retrieval.embed_field": "raw_text"}},
    "search": {"hybrid": {"retrieval.search": "hybrid"}, "vector": {"retrieval.search": "vector"},
               "keyword": {"retrieval.search": "keyword"}},
    "rerank": {"off": {"models.reranker": None, "retrieval.rerank": False},
               "on": {"models.reranker": "{eval.ablate_reranker}", "retrieval.rerank": True}},
}
"""factor -> level -> the settings that level sets (dotted keys). Every level sets its factor in
full, so the reference does not take a value from the configuration or the environment that a
row changes. "{section.key}" is that setting's value in the base configuration;
"{reference.matched_fixed_size}" is the fixed splitter's size whose chunks on this corpus are as
long as the reference's on average (`matched_fixed_size`), with 10% overlap. The first level of
each factor is the reference."""
BASE = {f: next(iter(levels)) for f, levels in FACTORS.items()}
BUILD_FACTORS = ("chunking", "index")
"""Factors that need their own knowledge base; the others change only how it is searched."""
CORPORA = ("paragraphs", "long")


@dataclass
class Row:
    factor: str
    level: str
    levels: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "reference" if self.factor == "reference" else f"{self.factor}={self.level}"

    def overrides(self, base: Settings, reference: dict | None = None) -> dict:
        """The settings this row changes, `{...}` references resolved in `base` and in the
        reference row's build (`reference`: its chunk statistics)."""
        out: dict = {}
        for f, lv in self.levels.items():
            for key, value in FACTORS[f][lv].items():
                out[key] = _resolve(value, base, reference)
        return out

    @property
    def build(self) -> str:
        """The knowledge base this row searches (one per chunking x index combination)."""
        return "-".join(self.levels[f] for f in BUILD_FACTORS)


def _resolve(value, base: Settings, reference: dict | None):
    if not (isinstance(value, str) and value.startswith("{") and value.endswith("}")):
        return value
    ref, _, div = value[1:-1].partition("/")
    section, name = ref.split(".")
    if section == "reference":
        if reference is None:
            raise ValueError(f"{value} needs the reference row's build first")
        return max(1, round(reference[name] / (int(div) if div else 1)))
    return getattr(getattr(base, section), name)


def grid(factors: Sequence[str] | None = None) -> list[Row]:
    """The reference, then each other level of each factor (one factor changed at a time)."""
    rows = [Row("reference", "", dict(BASE))]
    for f, levels in FACTORS.items():
        if factors and f not in factors:
            continue
        rows += [Row(f, lv, {**BASE, f: lv}) for lv in levels if lv != BASE[f]]
    return rows


def corpus(name: str, squad: str | Path, out: Path, splits: tuple[str, ...],
           unanswerable: tuple[str, ...] = ("out",)) -> tuple[Path, Path]:
    """Write corpus `name`'s documents and its questions (JSONL with gold context) under `out`:
    those of `splits` (in the KB) and of `unanswerable` (`in_kb` false: their paragraphs are not)."""
    from eval.longdocs import write_long_docs
    from eval.squad_docs import write_docs, write_questions

    docs, questions = out / name / "docs", out / name / "questions.jsonl"
    ask = tuple(dict.fromkeys(splits + unanswerable))
    shutil.rmtree(docs, ignore_errors=True)  # documents of an earlier run with other splits must not stay
    if name == "long":
        write_long_docs(squad, docs, splits, questions=questions, ask=ask)
    elif name == "paragraphs":
        write_docs(squad, docs, splits)
        write_questions(squad, questions, ask, in_kb=splits)
    else:
        raise ValueError(f"unknown corpus {name!r}: use {', '.join(CORPORA)}")
    return docs, questions


def row_settings(config: str | Path | None, home: Path, models_dir: Path, overrides: dict) -> Settings:
    """The configuration (with the environment) and then the row's settings, which win over both."""
    return apply_overrides(load_settings(config), {"home": home, "models.dir": models_dir, **overrides})


BUILD_VERSION = 3
"""Part of every build's fingerprint: raise it when the way a KB is built changes."""


def fingerprint(settings: Settings, docs: Path, source: str = "") -> str:
    """What a built KB depends on: the documents, the settings that shape chunks and index, and
    (`source`) the fingerprint of the KB whose store it copies."""
    parts = {k: settings.model_dump(mode="json")[k] for k in ("models", "parse", "clean", "chunking", "nsp_train",
                                                               "keyinfo", "retrieval")}
    parts["models"].pop("reranker", None)
    parts["retrieval"] = {k: parts["retrieval"][k] for k in ("levels", "embed_field")}
    parts["retrieval"]["keywords"] = settings.retrieval.uses_keywords
    parts["version"], parts["source"] = BUILD_VERSION, source
    return hashlib.sha256((json.dumps(parts, sort_keys=True) + data_digest([docs])).encode()).hexdigest()


def build_kb(settings: Settings, name: str, docs: Path, like: Path | None, progress: bool) -> dict:
    """Ingest `docs` into KB `name`, or with `like` copy that KB's store (the same chunks) and
    build only this row's index. A KB built before from the same documents and settings is reused;
    one built otherwise is deleted and rebuilt."""
    from retrieval.knowledge_base import KnowledgeBase

    origin = json.loads((like / "ablate.json").read_text()) if like is not None else {}
    target, mark = settings.kb_dir(name), fingerprint(settings, docs, origin.get("fingerprint", ""))
    stamp = target / "ablate.json"
    if (target / "store.sqlite").is_file():
        saved = json.loads(stamp.read_text()) if stamp.is_file() else {}
        if saved.get("fingerprint") == mark:
            return saved["build"]
        KnowledgeBase(settings, name).delete()
    if like is not None:
        shutil.copytree(like, target, ignore=shutil.ignore_patterns("index", ".write.lock", "ablate.json"))
    kb = KnowledgeBase(settings, name, create=True)
    report = kb.add_paths([docs], progress=progress) if like is None else {"index": kb.sync(progress)}
    with kb.store() as store:
        n, mean = store.conn.execute("SELECT COUNT(*), AVG(LENGTH(text)) FROM chunks").fetchone()
    chunker = report.get("chunker") if like is None else origin["build"]["chunker"] + " (store copied)"
    build = {"kb": name, "chunks": n, "mean_chunk_chars": round(mean or 0.0, 1), "failed": report.get("failed", []),
             "chunker": chunker, "nsp_head": report.get("nsp"), "seconds": report.get("seconds")}
    stamp.write_text(json.dumps({"fingerprint": mark, "build": build}, ensure_ascii=False, default=str))
    return build


def paired(a: list[dict], b: list[dict], key: str) -> dict:
    """Questions right in `b` and wrong in `a` (`gained`), and the reverse (`lost`)."""
    ra = {r["id"]: bool(r.get(key)) for r in a}
    gained = sum(1 for r in b if r.get(key) and not ra.get(r["id"]))
    lost = sum(1 for r in b if not r.get(key) and ra.get(r["id"]))
    return {"gained": gained, "lost": lost}


def matched_fixed_size(docs: Path, target_chars: float, overlap: float = 0.1) -> int:
    """The fixed splitter's size whose chunks of the documents under `docs` are `target_chars`
    long on average (its size is a maximum: its chunks come out shorter)."""
    from ingest.chunking import FixedChunker

    texts = [p.read_text(encoding="utf-8") for p in sorted(docs.rglob("*")) if p.is_file()]

    def mean_len(size: int) -> float:
        splitter = FixedChunker(size, max(0, round(size * overlap))).splitter
        pieces = [c for t in texts for c in splitter.split_text(t) if c.strip()]
        return sum(len(c.strip()) for c in pieces) / max(1, len(pieces))

    sizes = range(max(20, round(target_chars * 0.8)), round(target_chars * 3) + 1, 5)
    return min(sizes, key=lambda n: abs(mean_len(n) - target_chars))


def check_chunker(row: Row, build: dict) -> None:
    """ValueError when ingestion used another chunker than the row names (e.g. the pipeline fell
    back to fixed-size chunks because the pair head could not be trained)."""
    level = row.levels["chunking"]
    used = str(build.get("chunker") or "").removesuffix(" (store copied)")
    ok = used.startswith("nsp (") if level.startswith("nsp") else used == level.split("-")[0]
    if not ok:
        raise ValueError(f"{build['kb']}: the row {row.name} asks for {level} chunks, ingestion used {used!r}")


@dataclass
class Builds:
    """The knowledge bases of one corpus, built on demand (the reference's first: other rows may
    refer to its chunk statistics) and reused."""

    corpus: str
    docs: Path
    config: str | Path | None
    base: Settings
    home: Path
    progress: bool = True
    say: Callable[[str], None] = log.info
    done: dict[str, dict] = field(default_factory=dict)

    def settings(self, row: Row) -> tuple[Settings, str, dict]:
        """The row's settings, the name of the KB it searches (built if needed) and its overrides."""
        reference = Row("reference", "", dict(BASE))
        if row.build != reference.build and reference.build not in self.done:
            self.settings(reference)
        ref = self.done.get(reference.build)
        if ref is not None and "matched_fixed_size" not in ref:
            ref["matched_fixed_size"] = matched_fixed_size(self.docs, ref["mean_chunk_chars"])
        overrides = row.overrides(self.base, ref)
        s = row_settings(self.config, self.home, self.base.models_dir().resolve(), overrides)
        kb_name = f"{self.corpus}-{row.build}"
        if row.build not in self.done:
            like = None
            if row.levels["index"] != BASE["index"]:
                flat = Row(row.factor, row.level, {**row.levels, "index": BASE["index"]})
                self.settings(flat)
                like = s.kb_dir(f"{self.corpus}-{flat.build}")
            self.say(f"[{self.corpus}] KB {kb_name}")
            self.done[row.build] = build_kb(s, kb_name, self.docs, like, self.progress)
            check_chunker(row, self.done[row.build])
        return s, kb_name, overrides


def run_corpus(builds: Builds, rows: list[Row], questions: list[Question], k: int) -> list[dict]:
    """Score every row on `questions` (building the KBs they need)."""
    from eval.retrieval import evaluate_retrieval
    from retrieval.knowledge_base import KnowledgeBase

    out = []
    for row in rows:
        s, kb_name, overrides = builds.settings(row)
        builds.say(f"[{builds.corpus}] {row.name}: {len(questions)} questions")
        res = evaluate_retrieval(KnowledgeBase(s, kb_name), questions, k, progress=builds.progress)
        out.append({"corpus": builds.corpus, "row": row.name, "factor": row.factor, "level": row.level,
                    "levels": row.levels, "overrides": overrides, "build": builds.done[row.build], **res})
    ref = out[0]["per_question"]
    for r in out:
        r["vs_reference"] = {m: paired(ref, r["per_question"], m) for m in ("strict", "answer_in_budget")}
    return out


def run_ablation(squad: str | Path, work: str | Path, *, config: str | Path | None = None,
                 corpora: Sequence[str] = CORPORA, splits: tuple[str, ...] = ("kb",),
                 factors: Sequence[str] | None = None, k: int = 5, limit: int | None = None, progress: bool = True,
                 say: Callable[[str], None] = log.info) -> dict:
    """The whole grid on each corpus; the result has every row's metrics and per-question rows."""
    from eval.report import provenance

    work = Path(work)
    base = load_settings(config)
    home = work / "kb"
    rows = grid(factors)
    result: dict = {"provenance": provenance(base, [squad]), "grid": [r.name for r in rows], "factors": FACTORS,
                    "reference": BASE, "splits": list(splits), "k": k, "corpora": {}, "rows": []}
    for name in corpora:
        docs, qfile = corpus(name, squad, work, splits)
        questions, problems = load_questions(qfile)
        questions = [q for q in questions if q.meta.get("in_kb", True)][:limit]
        result["corpora"][name] = {"documents": sum(1 for _ in docs.iterdir()), "questions": len(questions),
                                   "sha256": data_digest([Path(squad)]), "docs_sha256": data_digest([docs]),
                                   "doc_chars": sorted(len(p.read_text(encoding="utf-8")) for p in docs.iterdir()),
                                   "skipped": problems}
        builds = Builds(name, docs, config, base, home, progress, say)
        result["rows"] += run_corpus(builds, rows, questions, k)
    return result
