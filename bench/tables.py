"""Regenerate the README's tables of measured figures from the result files under bench/results/.

    python -m bench.tables            # print every table
    python -m bench.tables --write    # replace each marked table in README.md with its regeneration
    python -m bench.tables --check    # exit 1, naming each README table that differs from its files

A table in README.md is marked by a line `<!-- table: NAME -->` before it and `<!-- /table -->`
after it; NAME is a key of `TABLES`. To add one, write a function that returns the Markdown table
from `load(...)`ed result files, decorate it with `@table("NAME")` and mark the README. Row labels
may be literal; every figure must come from a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"

TABLES: dict[str, Callable[[], str]] = {}

BLOCK = re.compile(r"^<!-- table: (?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /table -->$", re.M | re.S)
OPEN = re.compile(r"^<!-- table: ([\w-]+) -->$", re.M)
CLOSE = re.compile(r"^<!-- /table -->$", re.M)


class MissingResult(Exception):
    """A table needs a result file that is not under bench/results/."""

    def __init__(self, name: str) -> None:
        super().__init__(f"result file bench/results/{name}.json is missing")
        self.name = name


def table(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a function returning the Markdown table marked `name` in the README."""

    def register(fn: Callable[[], str]) -> Callable[[], str]:
        TABLES[name] = fn
        return fn

    return register


def load(name: str) -> dict:
    """The result file bench/results/`name`.json; MissingResult when it is not there."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise MissingResult(name)
    return json.loads(path.read_text(encoding="utf-8"))


def num(x: float, digits: int = 3) -> str:
    """`x` rounded half up to `digits` decimals (`eval.report.half_up`)."""
    from eval.report import half_up

    return half_up(x, digits)


def pct(x: float, digits: int = 1) -> str:
    """A share as a percentage, rounded half up."""
    q = (Decimal(repr(x)) * 100).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{q}%"


def bold(cell: str) -> str:
    """A Markdown cell in bold."""
    return f"**{cell}**"


def md(rows: list[list], head: list[str]) -> str:
    """A Markdown table of `rows` under `head`."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def device(d: dict) -> str:
    """The device of a result file without its CPU-core count suffix."""
    return d["device"].split(" (")[0]


@table("retrieval_cmrc")
def retrieval_cmrc_table() -> str:
    """CMRC retrieval by embedder and search (retrieval_cmrc_{vec_minilm,vec_e5,hybrid_e5}.json)."""
    runs = [("retrieval_cmrc_vec_minilm", "MiniLM (English; the old default), vector only", False),
            ("retrieval_cmrc_vec_e5", "**e5-small (the default)**, vector only", False),
            ("retrieval_cmrc_hybrid_e5", "**e5-small, hybrid with BM25 (the default)**", True)]
    rows = []
    for name, label, strong in runs:
        d = load(name)
        figures = [num(d[m]) for m in ("recall@1", "recall@5", "mrr", "ndcg@5", "recall@5_strict")]
        rows.append([label, *(bold(f) if strong else f for f in figures), num(d["queries_per_s"], 1)])
    return md(rows, ["embedder, search", "recall@1", "recall@5", "MRR", "nDCG@5",
                     "recall@5, hit from the gold paragraph", "queries/s (2 cores)"])


SEGMENT_METHODS = {"nsp cross-encoder": "nsp cross-encoder (`nsp-e5`)", "nsp pair head": "nsp pair head (e5-small)",
                   "fixed (RecursiveCharacterTextSplitter)": "fixed, RecursiveCharacterTextSplitter"}
SEGMENT_SOURCES = {"tuned on the train split": " (tuned)", "chunking.threshold": " (config)"}


@table("segmentation_cmrc")
def segmentation_cmrc_table() -> str:
    """Topic segmentation of held-out CMRC documents by chunker; the best Pk, WindowDiff and F1 in bold."""
    methods = load("segmentation_cmrc")["methods"]
    best = {"pk": min(m["pk"] for m in methods), "windowdiff": min(m["windowdiff"] for m in methods),
            "f1": max(m["f1"] for m in methods)}
    rows = []
    for m in methods:
        cells = [num(m[k]) if m[k] != best.get(k) else bold(num(m[k]))
                 for k in ("pk", "windowdiff", "precision", "recall", "f1")]
        setting = m["setting"] + SEGMENT_SOURCES.get(m["source"], "")
        rows.append([SEGMENT_METHODS[m["method"]], setting, *cells, num(m["mean_chunk_chars"], 0)])
    return md(rows, ["method", "setting", "Pk", "WindowDiff", "boundary P", "R", "F1", "mean chunk chars"])


@table("rerank_cmrc")
def rerank_cmrc_table() -> str:
    """Retrieval with and without the reranker on 200 held-out CMRC questions; the default row in bold."""
    runs = [("rerank_cmrc_off", "hybrid (BM25 + e5), no reranker"),
            ("rerank_cmrc_on10", "hybrid + `rerank-e5`, 10 candidates"),
            ("rerank_cmrc_on20", "hybrid + `rerank-e5`, 20 candidates"),
            ("rerank_cmrc_vec_off", "vector only (e5), no reranker"),
            ("rerank_cmrc_vec_on10", "vector only + `rerank-e5`, 10 candidates")]
    rows, ns = [], set()
    for i, (name, label) in enumerate(runs):
        d = load(name)
        ns.add(d["n"])
        figures = [num(d[m]) for m in ("recall@1", "recall@5", "mrr")]
        rows.append([label, *(bold(f) if i == 0 else f for f in figures), num(1000 / d["queries_per_s"], 0)])
    n = "/".join(f"{x:,}" for x in sorted(ns))
    return md(rows, [f"retrieval (n = {n} held-out questions)", "recall@1", "recall@5", "MRR",
                     "ms per query (2 cores)"])


@table("injection")
def injection_table() -> str:
    """Attacked documents answered with quoting on and off (injection.json)."""
    d = load("injection")
    rows = []
    for subset, label in (("attacks", "the filter's own"), ("heldout", "held out")):
        for mode, quoting in (("quoted", "on (default)"), ("raw", "off")):
            s = d[mode]["by_set"][subset]
            rows.append([f"{label} ({s['n']})", quoting, f"{s['steered_answers']} of {s['n']}",
                         f"{s['answered']} of {s['n']}"])
    return md(rows, ["attacks", "quoting", "answers carrying the attacker's payload", "answered"])


@table("confidence")
def confidence_table() -> str:
    """Fallback rates at the old and the calibrated confidence threshold (confidence_cmrc.json)."""
    ev = load("confidence_cmrc")["evaluation"]
    rows = []
    for key, label, strong in (("at_configured", "(the old MiniLM-era value)", False),
                               ("at_chosen", "(calibrated, the default)", True)):
        r = ev[key]
        cells = [f"{num(r['threshold'], 2)} {label}", pct(r["false_fallback_rate"]),
                 pct(r["unanswerable_fallback_rate"])]
        rows.append([bold(c) for c in cells] if strong else cells)
    return md(rows, ["threshold", "false fallbacks (answerable, passage in the KB)",
                     "fallbacks on questions about documents not in the KB"])


LATENCY_VARIANTS = {"default": "default (bf16, system-prompt cache, k=3, 1,000 chars)",
                    "no_prefix_cache": "without the system-prompt cache", "fp32": "fp32 instead of bf16",
                    "int8": "`llm.quantize: int8`", "context_600": "600 characters of context"}


@table("answer_latency")
def answer_latency_table() -> str:
    """Answer latency of each variant of the local LLM on the CPU (answer_latency_cpu.json)."""
    rows = []
    for s in load("answer_latency_cpu")["summary"]:
        rows.append([LATENCY_VARIANTS[s["variant"]], num(s["p50_s"], 2), num(s["p95_s"], 2), num(s["ttft_p50_s"], 2),
                     num(s["ttft_p95_s"], 2), num(s["model_ttft_p50_s"], 2), num(s["prompt_tokens_mean"], 0),
                     num(s["new_tokens_mean"], 1), num(s["answer_has_gold"], 2)])
    return md(rows, ["variant", "p50 s", "p95 s", "TTFT p50", "TTFT p95", "model TTFT p50", "prompt tokens",
                     "new tokens", "answer holds gold"])


@table("load_cpu")
def load_cpu_table() -> str:
    """Latency percentiles under 50 concurrent clients (load_cpu.json)."""
    d = load("load_cpu")
    rows = [[part, f"{d[part]['n']}", num(d[part]["p50_ms"], 1), num(d[part]["p95_ms"], 1), num(d[part]["p99_ms"], 1)]
            for part in ("all", "ask", "chat_stream")]
    return md(rows, ["requests", "n", "p50 ms", "p95 ms", "p99 ms"])


@table("generate_gpu")
def generate_gpu_table() -> str:
    """Generation speed on the GPU against the memory-bandwidth bound (generate_gpu.json)."""
    rows = []
    for r in load("generate_gpu")["runs"]:
        s, p = r["setting"], r["project"]
        rows.append([s["shape"], s["mode"], s["prompt_tokens"], num(p["ttft_ms"], 2), num(p["tokens_per_s"], 1),
                     num(r["bound"]["tokens_per_s"], 1), pct(p["share_of_bandwidth_bound"], 0),
                     num(p["peak_mem_gib"], 2)])
    return md(rows, ["shape", "KV cache", "prompt tokens", "time to first token ms", "decode tokens/s",
                     "bound tokens/s", "share of bound", "peak GiB"])


@table("finetune_gpu")
def finetune_gpu_table() -> str:
    """Fine-tuning speed and memory: the project's trainer, plain Trainer + peft, Liger + flattening,
    Liger on packed rows, one run per file (finetune_gpu_*.json; the 0.5B full rows several times).
    `log every`: the logging interval of every side (files without it logged every step)."""
    rows = []
    sides = ("project", "baseline", "recipe", "recipe_packed")
    names = ("finetune_gpu_0.5b", "finetune_gpu_0.5b_run2", "finetune_gpu_0.5b_graphs", "finetune_gpu_0.5b_graphs_run2",
             "finetune_gpu_0.5b_nosync", "finetune_gpu_0.5b_nosync_run2", "finetune_gpu_0.5b_nosync_30steps",
             "finetune_gpu_0.5b_nosync_30steps_run2", "finetune_gpu_0.5b_nosync_30steps_run3",
             "finetune_gpu_7b", "finetune_gpu_7b_graphs", "finetune_gpu_7b_nosync", "finetune_gpu_7b_nockpt",
             "finetune_gpu_7b_nockpt_nosync")
    for name in names:
        for r in load(name)["runs"]:
            s, p = r["setting"], r["project"]
            width = f"{s['batch_rows']} x {s['max_length']}" + (", ckpt" if s["gradient_checkpointing"] else "")
            shape = s["shape"][:-1] + s["shape"][-1].upper()
            rows.append([shape, s["lengths"], width, name.removeprefix("finetune_gpu_"), s.get("logging_steps", 1),
                         s["timed_steps"],
                         *(f"{num(r[x]['tokens_per_s'], 0)} ({num(r[x]['peak_mem_gib'], 1)})" if r.get(x) else "–"
                           for x in sides),
                         f"{_ratio(r, 'speedup_vs_recipe')} / {_ratio(r, 'speedup_vs_recipe_packed')}",
                         f"{pct(p['mfu'])} / {pct(p['hfu'])}"])
    return md(rows, ["shape", "lengths", "rows x width", "file", "log every", "timed steps", "project tokens/s (GiB)",
                     "Trainer + peft",
                     "Liger + flattening", "Liger, packed rows", "project vs flattening / packed", "project MFU / HFU"])


@table("finetune_gpu_syncs")
def finetune_gpu_syncs_table() -> str:
    """The 7B step without checkpointing (4 x 1024, project side) before and after the device syncs
    were taken out of the step, with the GPU's busy share where it was recorded."""
    rows = []
    names = {"finetune_gpu_7b_nockpt": "before (previous session: no CUDA graphs, logged every step, "
                                       "timed to the end of training)",
             "finetune_gpu_7b_nockpt_syncs_ablation": "the syncs put back (timed between step marks)",
             "finetune_gpu_7b_nockpt_busy": "after, with --gpu-busy --gap-ops",
             "finetune_gpu_7b_nockpt_nosync": "after, all four sides"}
    for name, what in names.items():
        p = load(name)["runs"][0]["project"]
        busy = p.get("gpu_busy_share")
        gaps = p.get("idle_gaps_ms") or []
        rows.append([name.removeprefix("finetune_gpu_"), what, num(p["tokens_per_s"], 0), pct(p["mfu"]),
                     pct(busy) if busy is not None else "–", num(gaps[0][0], 1) if gaps else "–"])
    return md(rows, ["file", "step", "tokens/s", "MFU", "GPU busy (2 steps)", "longest idle gap ms"])


def _ratio(run: dict, key: str) -> str:
    """A speed-up as `1.23x`, or a dash when the run had not that side."""
    return f"{num(run[key], 2)}x" if run.get(key) is not None else "–"


@table("vector_backends_cpu")
def vector_backends_table() -> str:
    """Level-1 search on FAISS HNSW against Milvus (Lite) HNSW, same vectors and queries (vector_backends_cpu.json)."""
    rows = []
    for r in load("vector_backends_cpu")["runs"]:
        n, f, m = num(r["setting"]["vectors"], 0), r["faiss_hnsw"], r["milvus_hnsw"]
        rows.append([n, "FAISS HNSW (embedded)", f"{num(f['build_s'], 1)} (index build)", num(f["qps_single"], 1),
                     num(f["qps_batched"], 1), num(f["recall_at_k"], 3)])
        rows.append([n, f"Milvus Lite HNSW ({m['uri']})",
                     f"{num(m['insert_s'], 1)} inserts + {num(m['first_search_s'], 1)} first search",
                     num(m["qps_single"], 1), num(m["qps_batched"], 1), num(m["recall_at_k"], 3)])
    return md(rows, ["vectors", "backend", "seconds to searchable", "queries/s one at a time",
                     "queries/s in batches of 100", "recall@10 vs exact"])


@table("replicas_cpu")
def replicas_table() -> str:
    """API load on 1 and 2 replicas over the shared backends and on the embedded ones (replicas_cpu.json)."""
    rows = []
    names = {"embedded": "SQLite + FAISS (embedded)", "shared": "PostgreSQL + Milvus Lite server"}
    for r in load("replicas_cpu")["runs"]:
        rows.append([names[r["backend"]], r["replicas"], r["clients"], num(r["requests"], 0), r["errors"],
                     num(r["rps"], 1), num(r["p50_ms"], 0), num(r["p95_ms"], 0)])
    return md(rows, ["backends", "replicas", "clients", "requests", "errors", "requests/s", "p50 ms", "p95 ms"])


@table("embed_finetune_gpu")
def embed_finetune_gpu_table() -> str:
    """Embedder fine-tuning: the project's loop vs SentenceTransformerTrainer (embed_finetune_gpu.json)."""
    rows = []
    for r in load("embed_finetune_gpu")["runs"]:
        p, b = r["project"], r["baseline"]
        rows.append([r["shape"], r["method"], num(p["examples_per_s"], 0), num(b["examples_per_s"], 0),
                     f"{num(r['speedup'], 2)}x", f"{num(p['peak_mem_gib'], 1)} / {num(b['peak_mem_gib'], 1)}",
                     f"{num(p['first_loss'], 4)} / {num(b['first_loss'], 4)}"])
    return md(rows, ["shape", "method", "project examples/s", "sentence-transformers examples/s", "speed-up",
                     "GiB project / ST", "first loss project / ST"])


@table("ingest_e2e_gpu")
def ingest_e2e_gpu_table() -> str:
    """kb ingest end to end on the GPU: throughput and the largest stages (ingest_e2e_gpu.json)."""
    rows = []
    for r in load("ingest_e2e_gpu")["runs"]:
        s, p = r["setting"], r["project"]
        top = sorted(p["stage_share"].items(), key=lambda kv: -kv[1])[:3]
        rows.append([f"{s['device']}, {s['model_shape']} shapes, {s['dtype']}, parsing {s['parse']}", num(s["docs"], 0),
                     num(p["docs_per_s"], 2),
                     num(p["chunks_per_s"], 1), num(p["nsp_pairs_per_s_in_model"], 0),
                     num(p["embedded_texts_per_s_in_model"], 0), ", ".join(f"{k} {pct(v, 0)}" for k, v in top)])
    return md(rows, ["run", "documents", "docs/s", "chunks/s", "NSP pairs/s (in model calls)",
                     "texts embedded/s (in model calls)", "largest stages"])


DIST_RUNS = {"ddp_lora": ("DDP", "LoRA", " (includes compiling the layers)"), "zero2_lora": ("ZeRO-2", "LoRA", ""),
             "zero3_lora": ("ZeRO-3", "LoRA", ""), "zero3_full": ("ZeRO-3", "full", "")}


@table("finetune_dist")
def finetune_dist_table() -> str:
    """Fine-tuning on 2 GPUs: DDP, ZeRO-2, ZeRO-3 (finetune_dist_gpu.json)."""
    runs = load("finetune_dist_gpu")["runs"]
    rows = []
    for r in runs:
        run, method, note = DIST_RUNS[r["setting"]]
        rows.append([run, method, num(r["tokens_per_s"], 0) + note, num(r["peak_mem_gib_per_gpu"], 1),
                     num(r["train_loss"], 3)])
    steps = {r["steps"] for r in runs}
    return md(rows, ["run", "method", "tokens/s, both GPUs, whole run", "peak GiB per GPU",
                     f"loss after {'/'.join(map(str, sorted(steps)))} steps"])


@table("embed_ft")
def embed_ft_table() -> str:
    """CMRC retrieval before and after fine-tuning MiniLM (embed_ft_cmrc_*.json, retrieval_cmrc_default.json)."""
    runs = [("embed_ft_cmrc_vec_before", "vector only, packaged MiniLM"),
            ("embed_ft_cmrc_vec_after", "vector only, fine-tuned MiniLM"),
            ("retrieval_cmrc_default", "hybrid (default), packaged MiniLM"),
            ("embed_ft_cmrc_hyb_after", "hybrid (default), fine-tuned MiniLM")]
    rows, ns = [], set()
    for name, label in runs:
        d = load(name)
        ns.add(d["n"])
        rows.append([label, num(d["recall@1"]), num(d["recall@5"]), num(d["mrr"])])
    n = "/".join(f"{x:,}" for x in sorted(ns))
    return md(rows, [f"retrieval on the CMRC KB (n = {n} held-out questions)", "recall@1", "recall@5", "MRR"])


LOOP_RUNS = [("extractive", "extractive (no LLM)", None), ("base", "packaged Qwen2.5-0.5B, no adapter", "base"),
             ("adapter", "+ the project's answer adapter (default)", "adapter"),
             ("kb_lora", "+ a LoRA trained on this KB", "kb_lora")]


def loop_cmmlu(run: str | None) -> str:
    """The CMMLU cell of a loop row: accuracy and n, or why there is none."""
    if run is None:
        return "– (no LLM)"
    path = RESULTS / f"loop_cmmlu_{run}.json"
    if not path.is_file():
        return "not run"
    d = load(f"loop_cmmlu_{run}")
    return f"{num(d['accuracy'])} (n={d['n']})"


LOOP_PER_QUESTION = {"exact_match": "exact_match", "f1": "f1", "contains_answer": "contains_answer",
                     "refusal_rate": "refused", "false_fallback_rate": "fallback"}


def answerable_mean(d: dict, key: str) -> float:
    """A `kb eval open` rate over the answerable questions, from the unrounded per-question rows (the
    summary keeps 4 decimals, so rounding it again to 3 could round twice); ValueError if they disagree."""
    rows = [q for q in d["per_question"] if q.get("in_kb", True)]
    value = sum(q[LOOP_PER_QUESTION[key]] for q in rows) / len(rows)
    if abs(value - d[key]) > 5e-5:
        raise ValueError(f"{key}: per-question mean {value:.5f} disagrees with the summary {d[key]}")
    return value


@table("loop")
def loop_table() -> str:
    """The loop's four answerers on the same KB and questions (loop_open_*.json, loop_cmmlu_*.json)."""
    rows = []
    for run, label, cmmlu in LOOP_RUNS:
        d = load(f"loop_open_{run}")
        figures = [num(answerable_mean(d, k)) for k in ("exact_match", "f1", "contains_answer")]
        figures += [num(d["citation_rate"])]
        figures += [num(answerable_mean(d, k)) for k in ("refusal_rate", "false_fallback_rate")]
        figures += [num(d["unanswerable_fallback_rate"])]
        rows.append([label, *figures, num(d["latency_p50_s"], 2), loop_cmmlu(cmmlu)])
    return md(rows, ["answerer", "EM", "F1", "contains answer", "cites `[n]` (answered)", "refusal",
                     "false fallback", "fallback, not in KB", "p50 s/answer", "CMMLU loglik acc."])


@table("search")
def search_table() -> str:
    """Vector search build time, QPS and recall by index (search_cpu.json, search_gpu.json)."""
    rows = []
    for name in ("search_cpu", "search_gpu"):
        d = load(name)
        for r in d["runs"]:
            s, p = r["setting"], r["project"]
            rows.append([f"{s['vectors']:,}", s["index"], s["backend"], p["build_s"], f"{p['qps_batch1']:,.0f}",
                         f"{p['qps_batch64']:,.0f}", p["recall@10"], device(d)])
    return md(rows, ["vectors", "index", "backend", "build s", "QPS batch 1", "QPS batch 64", "recall@10", "device"])


@table("ingest")
def ingest_table() -> str:
    """Ingestion rates by stage, batched and one at a time (ingest_cpu.json, ingest_gpu.json)."""
    rows = []
    for name in ("ingest_cpu", "ingest_gpu"):
        d = load(name)
        dev = device(d)
        for r in d["runs"]:
            s, p, b = r["setting"], r["project"], r.get("baseline", {})
            if s["part"] == "pipeline":
                rows.append(["parse + clean", "-", "-", f"{p['docs_per_s']} docs/s", "-", dev])
                rows.append(["NSP chunking", "minilm-l6 (random head)", 64, f"{p['chunks_per_s']} chunks/s", "-", dev])
                rows.append(["key information", "-", "-", f"{p['key_info_chunks_per_s']} chunks/s", "-", dev])
            elif s["part"] == "embed":
                rows.append(["embeddings", s["model_shape"], s["batch_size"], f"{p['texts_per_s']} texts/s",
                             f"{b['texts_per_s']} texts/s", dev])
            elif s["part"] == "nsp":
                rows.append(["NSP pairs (cross head)", s["model_shape"], s["batch_size"], f"{p['pairs_per_s']} pairs/s",
                             f"{b['pairs_per_s']} pairs/s", dev])
    return md(rows, ["stage", "model shape", "batch", "batched", "one at a time", "device"])


@table("ablation")
def ablation_table() -> str:
    """The retrieval ablation on both corpora (ablation_cmrc.json; eval.ablate_report.markdown)."""
    from eval.ablate_report import markdown

    return markdown(load("ablation_cmrc"))


@table("ablation_intact")
def ablation_intact_table() -> str:
    """Answer in budget over the questions whose gold paragraph ingestion kept intact, and the
    damaged ones (ablation_cmrc_intact.json, from bench/ablation_intact.py)."""
    d = load("ablation_cmrc_intact")
    rows = []
    for r in d["rows"]:
        i, g = r["intact"], r["damaged"]
        vs = "-" if r["row"] == "reference" else f"+{i['gained']} / -{i['lost']} (p = {num(i['sign_test_p'], 3)})"
        rows.append([r["corpus"], r["row"], num(i["answer_in_budget"]), vs, num(g["answer_in_budget"]),
                     f"+{g['gained']} / -{g['lost']}" if r["row"] != "reference" else "-"])
    n = {r["corpus"]: (r["intact"]["n"], r["damaged"]["n"]) for r in d["rows"]}
    head = ["corpus", "row", "answer in budget, intact", "vs reference, intact (sign test)",
            "answer in budget, damaged", "vs reference, damaged"]
    return md(rows, head) + "\n\n" + "; ".join(f"{c}: {a} intact, {b} damaged questions" for c, (a, b) in n.items())


@table("ablation_answers")
def ablation_answers_table() -> str:
    """The best three retrieval configurations answered by the LLM (ablation_answers_cmrc.json)."""
    from eval.ablate_answers import markdown

    return markdown(load("ablation_answers_cmrc"))


OCR_CONFIGS = {"tesseract[chi_sim+eng]": "**tesseract 5, chi_sim then chi_sim+eng (the default)**",
               "tesseract[chi_sim]": "tesseract 5, chi_sim only", "tesseract[eng]": "tesseract 5, eng only",
               "rapidocr": "rapidocr 1.4.4 (PP-OCRv4, onnxruntime)"}


@table("ocr")
def ocr_table() -> str:
    """OCR character error rate and pages/s by engine, language and page condition (ocr.json)."""
    d = load("ocr")
    cell = {(s["config"], s["lang"], s["condition"]): s for s in d["summary"]}
    rows = []
    for config, label in OCR_CONFIGS.items():
        got = [cell.get((config, lang, cond)) for lang in ("zh", "en") for cond in ("clean", "scan")]
        cers = [pct(g["cer"], 2) if g else "–" for g in got]
        speed = [num(g["pages_per_s"], 2) if g else "–" for g in got[:2]]
        rows.append([label, *cers, " / ".join(speed)])
    pages = sorted({s["pages"] for s in d["summary"]})
    return md(rows, ["engine", "CER zh clean", "CER zh scan-like", "CER en clean", "CER en scan-like",
                     f"pages/s zh clean / scan ({'/'.join(map(str, pages))} pages each, 1 process)"])


@table("formats")
def formats_table() -> str:
    """Per-format engine, what it needs installed, and parse seconds per file (formats.json)."""
    rows = [[f"`{r['format']}`", r["engine"], r["needs"], num(r["median_s"], 2)] for r in load("formats")["rows"]]
    return md(rows, ["format", "engine", "needs installed", "parse s/file (median)"])


@table("faq")
def faq_table() -> str:
    """FAQ direct answers at the chosen threshold: each calibration half and the other half held out (faq.json)."""
    d = load("faq")
    rows = []
    for r in d["results"]:
        if r["threshold"] is None:
            best = max(c["precision"] for c in r["curve_all"] if c["direct"])
            rows.append([r["scorer"], "both", "all", "none reaches the precision", f"best {num(best)}",
                         "–", "–", "–", "–"])
            continue
        for i, fold in enumerate(r["folds"]):
            for part in ("calibration", "held_out"):
                f = fold[part]
                rows.append([r["scorer"], f"half {i + 1}", part.replace("_", " "), num(f["threshold"], 4),
                             num(f["precision"]), num(f["coverage"]), f["wrong_entry"],
                             pct(f["false_direct_same_topic"]), pct(f["false_direct_other_topic"])])
    return md(rows, ["scorer", "fold", "queries", "threshold", "precision", "coverage of paraphrases",
                     "wrong entry", "same-topic near misses answered", "other-topic answered"])


@table("parse")
def parse_table() -> str:
    """Parsing docs/s on 1 and 2 worker processes against the cores (parse.json)."""
    d = load("parse")
    cores = d["cores"]
    rows = [[r["workers"], r["docs"], num(r["median_s"], 2), num(r["docs_per_s"], 2), f"{num(r['speedup'], 2)}x",
             num(max(r["loadavg_1m"]), 2)] for r in d["runs"]]
    return md(rows, ["workers", "documents", "median pass s", "docs/s", "speed-up",
                     f"max 1-min load ({cores['usable']} usable cores)"])


@table("table_units")
def table_units_table() -> str:
    """Row lookups in long tables by how a table is cut (table_units.json, table_units_minilm.json)."""
    labels = {"row": "one row per unit, `Column: value; ...` (the default)", "rows5": "5 rows per unit",
              "grid": "header line + rows, cells joined by bars, up to max_chars (before)"}
    e5, mini = load("table_units")["variants"], load("table_units_minilm")["variants"]
    rows = [[labels[k], e5[k]["chunks"], num(e5[k]["hit@1_en"]), num(e5[k]["hit@1_zh"]),
             num(mini[k]["hit@1_en"]), num(mini[k]["hit@1_zh"])] for k in labels]
    return md(rows, ["how a long table is cut", "chunks", "e5-small hit@1 en", "zh", "MiniLM hit@1 en", "zh"])


def blocks(text: str) -> dict[str, str]:
    """NAME -> body (without surrounding blank lines) of each marked table of a README text."""
    return {m["name"]: m["body"].strip("\n") for m in BLOCK.finditer(text)}


def marker_problems(text: str) -> list[str]:
    """Unbalanced, nested or repeated markers, and marked names that no function generates."""
    problems = []
    opens, closes = OPEN.findall(text), CLOSE.findall(text)
    found = [m["name"] for m in BLOCK.finditer(text)]
    if len(opens) != len(found) or len(closes) != len(found):
        problems.append(f"markers: {len(opens)} '<!-- table: NAME -->' and {len(closes)} '<!-- /table -->' lines, "
                        f"{len(found)} well-formed blocks")
    problems += [f"{name}: marked more than once" for name in sorted({n for n in found if found.count(n) > 1})]
    problems += [f"{name}: marked in the README but no function generates it" for name in found if name not in TABLES]
    return problems


def check(text: str, tables: dict[str, Callable[[], str]] | None = None) -> list[str]:
    """Every way a README text disagrees with the result files; empty when all tables match."""
    tables = TABLES if tables is None else tables
    marked = blocks(text)
    problems = marker_problems(text)
    for name, fn in tables.items():
        try:
            fresh = fn().strip("\n")
        except MissingResult as e:
            problems.append(f"{name}: {e}")
            continue
        if name not in marked:
            problems.append(f"{name}: not marked in the README (<!-- table: {name} --> ... <!-- /table -->)")
        elif marked[name] != fresh:
            problems.append(f"{name}: the README's table differs from its result files "
                            "(python -m bench.tables --write)")
    return problems


def write(text: str, tables: dict[str, Callable[[], str]] | None = None) -> str:
    """The README text with each marked table's body replaced by its regeneration (kept as it is
    where its result file is missing or no function generates it: `check` reports those)."""
    tables = TABLES if tables is None else tables

    def fresh(m: re.Match) -> str:
        body = m["body"].strip("\n")
        if m["name"] in tables:
            with contextlib.suppress(MissingResult):
                body = tables[m["name"]]().strip("\n")
        return f"<!-- table: {m['name']} -->\n{body}\n<!-- /table -->"

    return BLOCK.sub(fresh, text)


def main(argv: list[str] | None = None) -> int:
    """Print, write or check the tables; the exit status (1 when a table disagrees with its files)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the marked tables in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if a README table differs from its files")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)
    if args.check:
        problems = check(args.readme.read_text(encoding="utf-8"))
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{len(TABLES)} tables checked, {len(problems)} problems", file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        text = args.readme.read_text(encoding="utf-8")
        new = write(text)
        if new != text:
            args.readme.write_text(new, encoding="utf-8")
        problems = check(new)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    for name, fn in TABLES.items():
        print(f"<!-- table: {name} -->")
        try:
            print(fn())
        except MissingResult as e:
            print(f"({e})")
        print("<!-- /table -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
