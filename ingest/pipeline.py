"""The ingestion pipeline: files → parsed, cleaned documents → chunks → key info → store."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ingest.chunking import FixedChunker, NSPChunker, SentenceChunker, to_units
from ingest.keyinfo import build_extractor
from ingest.loaders import ParseError, discover, parse_document
from ingest.nsp import META_FILE, build_pairs, load_scorer_from, train_nsp_head, train_pair_head
from ingest.nsp_cross import train_cross_nsp
from ingest.sandbox import Limits, SandboxPool, worker_count
from ingest.sentences import split_sentences
from ingest.store import DocStore, open_store
from ingest.types import ParsedDocument, Unit
from kb.cross_encoder import is_sequence_classifier
from kb.cross_train import FitConfig
from kb.models import resolve_model
from kb.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class FileItem:
    """A file to ingest: where it is, the name it is cited by, and its identity in the KB."""

    path: Path
    source: str
    doc_id: str


@dataclass
class IngestReport:
    kb: str
    files: int = 0
    ingested: int = 0
    skipped: int = 0
    skipped_doc_ids: list[str] = field(default_factory=list)
    """The documents that were already in the KB unchanged (an identical re-upload)."""
    failed: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    """{"path", "warning"} for what an ingested file lost (pages OCR skipped, attachments not read)."""
    chunks: int = 0
    key_infos: int = 0
    seconds: float = 0.0
    chunker: str = ""
    doc_ids: list[str] = field(default_factory=list)
    nsp: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def doc_id_for(key: str) -> str:
    """A 16-hex-digit document id derived from `key` (SHA-1)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def items_from_paths(paths: Sequence[str | Path]) -> tuple[list[FileItem], list[dict]]:
    """Files under `paths`, cited relative to the folder given; missing paths are failures."""
    items: list[FileItem] = []
    missing: list[dict] = []
    for p in map(Path, paths):
        if not p.exists():
            missing.append({"path": str(p), "error": "no such file or folder"})
            continue
        for f in discover([p]):
            source = str(f.relative_to(p.parent)) if p.is_dir() else f.name
            items.append(FileItem(f, source, doc_id_for(str(f.resolve()))))
    return items, missing


def file_hash(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_item(item: FileItem, settings: Settings, content_hash: str | None = None) -> ParsedDocument:
    """Parse and clean one file in this process, without limits (raises ParseError)."""
    return parse_document(item.path, item.source, item.doc_id, content_hash or file_hash(item.path),
                          settings.parse, settings.clean)


PARSE_ERRORS = (ParseError, OSError, ValueError, RuntimeError)
"""What fails one file of a batch (the batch goes on); anything else stops the batch."""

Outcome = ParsedDocument | None | Exception
"""A file's parse outcome: its document, None (skipped: unchanged), or what failed it."""


AHEAD_PER_WORKER = 4
"""FileParser.parse_each keeps up to this many files per worker started but not yet handed on."""


def _never(item: FileItem, content_hash: str) -> bool:
    return False


class FileParser:
    """Parses files as `settings.parse` says: in sandboxed worker processes under the time and
    memory limits (`isolate`, the default; `workers` of them parse a batch, one file each at a
    time) or in this process, one file after another."""

    def __init__(self, settings: Settings) -> None:
        p = settings.parse
        self.settings = settings
        self.workers = worker_count(p.workers) if p.isolate else 1
        self.pool = SandboxPool(Limits(p.timeout_s, p.max_memory_mb), self.workers) if p.isolate else None

    def __enter__(self) -> FileParser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (those parsing are killed) and reap them."""
        if self.pool is not None:
            self.pool.close()

    def __call__(self, item: FileItem, content_hash: str | None = None) -> ParsedDocument:
        """The parsed, cleaned document (raises ParseError with the reason)."""
        content_hash = content_hash or file_hash(item.path)
        if self.pool is None:
            return parse_item(item, self.settings, content_hash)
        return self.pool.call(parse_document, *self._args(item, content_hash))

    def _args(self, item: FileItem, content_hash: str) -> tuple:
        s = self.settings
        return item.path, item.source, item.doc_id, content_hash, s.parse, s.clean

    def parse_each(self, items: Iterable[FileItem],
                   skip: Callable[[FileItem, str], bool] = _never) -> Iterator[tuple[FileItem, Outcome]]:
        """Each of `items`, in their order, with its outcome: the parsed document; None where
        `skip(item, content_hash)` says so (an unchanged file); or the PARSE_ERRORS exception that
        failed it. Up to `workers` files are parsed at once, and at most AHEAD_PER_WORKER times
        that many are started ahead of the caller (so that a slow file holds up the others only
        after they are that far ahead); in-process, each file is parsed when its turn comes."""
        window = AHEAD_PER_WORKER * self.workers if self.pool is not None else 1
        ahead: deque[tuple[FileItem, Future | Outcome]] = deque()
        for item in items:
            ahead.append((item, self._begin(item, skip)))
            if len(ahead) >= window:
                yield self._end(*ahead.popleft())
        while ahead:
            yield self._end(*ahead.popleft())

    def _begin(self, item: FileItem, skip: Callable[[FileItem, str], bool]) -> Future | Outcome:
        """Hash the file and start its parse (a Future on a worker); the outcome where it is known
        now (skipped, failed, or parsed in-process)."""
        try:
            content_hash = file_hash(item.path)
            if skip(item, content_hash):
                return None
            if self.pool is None:
                return parse_item(item, self.settings, content_hash)
            return self.pool.submit(parse_document, *self._args(item, content_hash))
        except PARSE_ERRORS as e:
            return e

    @staticmethod
    def _end(item: FileItem, pending: Future | Outcome) -> tuple[FileItem, Outcome]:
        if not isinstance(pending, Future):
            return item, pending
        try:
            return item, pending.result()
        except PARSE_ERRORS as e:
            return item, e


def nsp_dir(settings: Settings, kb: str) -> Path:
    """The folder of a knowledge base's trained NSP head."""
    return settings.kb_dir(kb) / "nsp"


def load_scorer(settings: Settings, kb: str):
    """The KB's adaptation of the configured NSP model (`kb train-nsp`, kind cross), else the
    configured model, else the KB's trained head, else None."""
    m, c = settings.models, settings.chunking
    d = nsp_dir(settings, kb)
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else None
    if m.nsp and not (meta and meta.get("kind") == "cross" and meta.get("adapted_from") == m.nsp):
        return load_scorer_from(resolve_model(m.nsp, "nsp"), m.device, c.max_seq_len, c.batch_size)
    if meta:
        return load_scorer_from(d, m.device, c.max_seq_len, c.batch_size)
    return None


def sections_of(units: list[Unit]) -> list[list[str]]:
    """Unit texts grouped by section, atomic units (tables, code, lists) left out."""
    out: dict[int, list[str]] = {}
    for u in units:
        if not u.atomic:
            out.setdefault(u.section, []).append(u.text)
    return [s for s in out.values() if s]


def stored_sections(store: DocStore, skip: set[str] = frozenset()) -> list[list[list[str]]]:
    """Sentences of the stored documents, grouped by titled section, for NSP training."""
    docs: list[list[list[str]]] = []
    by_doc: dict[str, dict[tuple, list[str]]] = {}
    for ch in store.chunks():
        if ch["doc_id"] in skip:
            continue
        sec = by_doc.setdefault(ch["doc_id"], {}).setdefault(tuple(ch["title_path"]), [])
        sec.extend(split_sentences(ch["text"]))
    for secs in by_doc.values():
        docs.append([s for s in secs.values() if s])
    return docs


def train_kb_nsp(settings: Settings, kb: str, docs: list[list[list[str]]] | None = None,
                 progress: bool = True) -> dict:
    """Train the KB's next-sentence head on `docs` (default: the KB's stored text)."""
    if docs is None:
        with open_store(settings, kb) as store:
            docs = stored_sections(store)
    t = settings.nsp_train
    pairs = build_pairs(docs, t.max_pairs, t.far_gap, t.seed)
    if len(pairs) < t.min_pairs:
        raise ValueError(f"knowledge base {kb!r} has too little text to train a next-sentence head: "
                         f"{len(pairs)} pairs < nsp_train.min_pairs={t.min_pairs}")
    encoder = resolve_model(settings.models.nsp_encoder, "nsp_encoder")
    if t.kind == "pair_head":
        return train_pair_head(pairs, encoder, nsp_dir(settings, kb), heldout=t.heldout, seed=t.seed,
                               device=settings.models.device, progress=progress)
    base_spec = cross_base(settings)
    if base_spec:
        return train_cross_nsp(
            pairs, resolve_model(base_spec, "nsp"), nsp_dir(settings, kb), base_spec=base_spec,
            fit_cfg=FitConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, head_lr=t.head_lr,
                              max_length=t.max_seq_len, seed=t.seed, max_seconds=t.max_seconds),
            lora_r=t.lora_r, top_layers=t.train_layers, heldout=t.heldout, device=settings.models.device,
            progress=progress, adapted_from=settings.models.nsp, trained_on=f"knowledge base {kb}")
    return train_nsp_head(
        pairs, encoder, nsp_dir(settings, kb),
        epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, head_lr=t.head_lr,
        train_layers=t.train_layers, max_seq_len=t.max_seq_len, heldout=t.heldout, seed=t.seed,
        device=settings.models.device, progress=progress)


def cross_base(settings: Settings) -> str | None:
    """What `nsp_train.kind: cross` trains on, as a model spec: the configured NSP model when it
    is a sequence-classification cross-encoder (adapted to the KB), else `models.nsp_encoder`
    unless that is a BERT (None: the BERT next-sentence-head path, `train_nsp_head`)."""
    from transformers import AutoConfig

    m = settings.models
    for spec in (m.nsp, m.nsp_encoder):
        if not spec:
            continue
        cfg = AutoConfig.from_pretrained(str(resolve_model(spec, "nsp")))
        if is_sequence_classifier(cfg):
            return spec
        if spec == m.nsp_encoder:
            return None if cfg.model_type == "bert" else spec
    return None


def ingest(items: Sequence[FileItem], kb: str, settings: Settings, *, progress: bool = True,
           on_file: Callable[[str, str], None] | None = None,
           failed: list[dict] | None = None) -> IngestReport:
    """Ingest `items` into knowledge base `kb`. Bad files go to `failed`; the rest go on."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    report = IngestReport(kb=kb, files=len(items) + len(failed or []), failed=list(failed or []))
    notify = on_file or (lambda path, status: None)
    with open_store(settings, kb) as store, FileParser(settings) as parse:
        parsed: list[ParsedDocument] = []  # all of the batch: an NSP head may be trained on them first
        bar = tqdm(total=len(items), desc=f"parse [{kb}]", disable=not progress, unit="file")

        def unchanged(item: FileItem, content_hash: str) -> bool:
            return store.is_unchanged(item.doc_id, content_hash)

        for item, outcome in parse.parse_each(items, skip=unchanged):
            bar.update(1)
            if outcome is None:
                report.skipped += 1
                report.skipped_doc_ids.append(item.doc_id)
                notify(item.source, "skipped")
            elif isinstance(outcome, ParseError):
                report.failed.append({"path": str(item.path), "error": str(outcome)})
                notify(item.source, f"failed: {outcome}")
            elif isinstance(outcome, Exception):
                report.failed.append({"path": str(item.path), "error": f"{type(outcome).__name__}: {outcome}"})
                notify(item.source, f"failed: {outcome}")
            else:
                parsed.append(outcome)
                report.warnings.extend({"path": str(item.path), "warning": w} for w in outcome.warnings)
                notify(item.source, "parsed")
        bar.close()
        if parsed:
            c = settings.chunking
            units = [to_units(d, c.max_chars, table_whole_chars=c.table_whole_chars,
                              table_rows_per_unit=c.table_rows_per_unit) for d in parsed]
            chunker, report.chunker, report.nsp = _chunker(settings, kb, store, units, parsed, progress)
            extractor = build_extractor(settings.keyinfo)
            group = 64
            bar = tqdm(total=len(parsed), desc=f"chunk+key info [{kb}]", disable=not progress, unit="doc")
            for s in range(0, len(parsed), group):
                docs = parsed[s : s + group]
                for doc, chunks in zip(docs, chunker.chunk_many(units[s : s + group])):
                    chunks, edits = store.apply_edits(doc.doc_id, chunks)  # people's chunk edits survive
                    kis = extractor.extract(doc, chunks)
                    store.replace_document(doc, chunks, kis, edits)
                    report.ingested += 1
                    report.chunks += len(chunks)
                    report.key_infos += len(kis)
                    report.doc_ids.append(doc.doc_id)
                    notify(doc.source, "ingested")
                    bar.update(1)
            bar.close()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _chunker(settings: Settings, kb: str, store: DocStore, units: list[list[Unit]],
             parsed: list[ParsedDocument], progress: bool):
    c = settings.chunking
    if c.method == "fixed":
        return FixedChunker(c.fixed_size, c.fixed_overlap), "fixed", None
    if c.method == "sentence":
        return SentenceChunker(), "sentence", None
    scorer = load_scorer(settings, kb)
    trained = None
    if scorer is None:
        new_ids = {d.doc_id for d in parsed}
        docs = stored_sections(store, skip=new_ids) + [sections_of(u) for u in units]
        try:
            trained = train_kb_nsp(settings, kb, docs, progress)
        except ValueError as e:
            log.warning("%s; using the fixed-size splitter for this ingest", e)
            return FixedChunker(c.fixed_size, c.fixed_overlap), f"fixed ({e})", None
        scorer = load_scorer(settings, kb)
    chunker = NSPChunker(scorer, c.threshold, c.temperature, c.max_chars, c.min_chars)
    return chunker, f"nsp ({scorer.model_dir})", trained
