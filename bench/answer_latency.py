"""Answer latency of the full chain on the packaged LLM (CPU): per answer and to the first token.

A KB of the bundled sample documents (English, and the Chinese employee handbook), 20 questions
(10 Chinese, 10 English) with gold answers. Every question is answered by every variant in turn
(rotating the order, so load from other processes falls on all alike) through `AnswerChain.stream`
in live mode, the way `kb ask --stream`, the HTTP API and the UI call it. Variants switch one lever
off (or change it) against the shipped default:

- `default`: the configuration as shipped (`llm.dtype: auto` = bf16 on a CPU with native bf16,
  the system-prompt KV cache, `answer.k` / `answer.max_context_chars`, `llm.generation.max_new_tokens`);
- `no_prefix_cache`: the system prompt's KV cache off;
- `fp32`: fp32 weights instead of bf16;
- `int8`: `llm.quantize: int8` (dynamic int8 Linear layers but the MLP down projections, fp32 elsewhere);
- `context_600`: 600 characters of context instead of the default.

Per answer: seconds to the final event, seconds to the first text the client sees, seconds to
the model's first piece, prompt and new tokens, whether the answer holds the gold string. The
context table says, without generating, how often the prompt's context holds the gold answer at
600 / 1,000 / 2,000 characters. The weights table compares each weight format with fp32 on the
chain's real prompts (teacher-forced): top-1 agreement of the next-token predictions and
perplexity, including int8 with every Linear layer quantized (`int8_all`, not a variant).

    OMP_NUM_THREADS=2 nice -n 5 python -m bench.answer_latency --name answer_latency_cpu
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import peak_rss_gib, table, write_result

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [  # (question, gold answers: any of them in the reply counts)
    ("员工每年有几天带薪年假？", ["15"]),
    ("病假期间工资怎么发放？", ["80%"]),
    ("女员工可以享受多少天产假？", ["158"]),
    ("一线城市出差住宿标准是每晚多少钱？", ["600"]),
    ("费用报销须在费用发生后多少天内提交？", ["30"]),
    ("员工电脑的开机密码至少要多少位？", ["12"]),
    ("发现电脑中毒应该拨打哪个电话？", ["8008-1234"]),
    ("公司每年为每位员工提供多少外部培训补贴？", ["8000"]),
    ("男员工可以享受几天陪产假？", ["15"]),
    ("单笔多少金额以上的报销需要财务总监审批？", ["5000"]),
    ("How many bottles of water were delivered?", ["20,000", "20000"]),
    ("How many trucks were used for the delivery?", ["3", "three"]),
    ("How many laptops were delivered?", ["200"]),
    ("On what date were the supplies delivered?", ["January 23"]),
    ("When was Iwan Roberts born?", ["1968"]),
    ("How many caps did Iwan Roberts win for Wales?", ["fifteen", "15"]),
    ("Which club did Roberts join in 1990?", ["Huddersfield"]),
    ("How many league appearances did Roberts make in his career?", ["647"]),
    ("What is the price of Juicy Apples?", ["1.99"]),
    ("How many years did Roberts spend at Norwich City?", ["seven", "7"]),
]
WARMUP = ["员工的工作时间是几点到几点？", "How long did the trucks take?"]
VARIANTS = {
    "default": {},
    "no_prefix_cache": {"llm.prefix_cache": False},
    "fp32": {"llm.dtype": "fp32"},
    "int8": {"llm.quantize": "int8"},
    "context_600": {"answer.max_context_chars": 600},
}
LLM_KEYS = ("llm.dtype", "llm.quantize")  # variants with these need their own copy of the model


class Recorder:
    """Wraps an LLM: records the prompt, the model's first-piece time and the generated text."""

    def __init__(self, llm, prefix_cache: bool) -> None:
        self.llm, self.name, self.prefix_cache = llm, llm.name, prefix_cache
        self.messages, self.t_first, self.text = None, None, ""

    def generate(self, messages):
        return self.llm.generate(messages)

    def stream(self, messages):
        self.llm.prefix_cache = self.prefix_cache
        self.messages, self.t_first, parts = messages, None, []
        try:
            for p in self.llm.stream(messages):
                if self.t_first is None and p:
                    self.t_first = time.perf_counter()
                parts.append(p)
                yield p
        finally:
            self.text = "".join(parts)


def open_kb(settings, name: str):
    from retrieval.knowledge_base import KnowledgeBase, NoSuchKB

    try:
        return KnowledgeBase(settings, name)
    except NoSuchKB:
        kb = KnowledgeBase(settings, name, create=True)
        out = kb.add_paths([ROOT / "samples" / "docs"], progress=True)
        print(f"ingested {out['ingested']} files, {out['chunks']} chunks in {out['seconds']:.1f}s", flush=True)
        return kb


def ask_once(chain, rec: Recorder, question: str, golds: list[str]) -> dict:
    rec.messages, rec.t_first, rec.text = None, None, ""
    t0 = time.perf_counter()
    first, final = None, None
    for ev in chain.stream(question, mode="live"):
        if isinstance(ev, dict):
            final = ev
        elif ev and first is None:
            first = time.perf_counter()
    t1 = time.perf_counter()
    tok = rec.llm.tokenizer
    prompt_tokens = int(rec.llm.inputs(rec.messages)["input_ids"].shape[1]) if rec.messages else 0
    return {"question": question, "seconds": round(t1 - t0, 3),
            "ttft_client_s": round((first or t1) - t0, 3),
            "ttft_model_s": round(rec.t_first - t0, 3) if rec.t_first else None,
            "prompt_tokens": prompt_tokens, "new_tokens": len(tok(rec.text, add_special_tokens=False)["input_ids"]),
            "fallback": final["fallback"], "reason": final["reason"], "replace": final["replace"],
            "answer": final["answer"], "generated": rec.text,
            "has_gold": any(g.lower() in final["answer"].lower() for g in golds)}


def summarize(rows: list[dict]) -> dict:
    def pct(key: str, q: int) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return round(float(np.percentile(vals, q)), 3) if vals else None

    return {"n": len(rows), "p50_s": pct("seconds", 50), "p95_s": pct("seconds", 95),
            "ttft_p50_s": pct("ttft_client_s", 50), "ttft_p95_s": pct("ttft_client_s", 95),
            "model_ttft_p50_s": pct("ttft_model_s", 50), "model_ttft_p95_s": pct("ttft_model_s", 95),
            "prompt_tokens_mean": round(float(np.mean([r["prompt_tokens"] for r in rows])), 1),
            "new_tokens_mean": round(float(np.mean([r["new_tokens"] for r in rows])), 1),
            "new_tokens_max": int(max(r["new_tokens"] for r in rows)),
            "answer_has_gold": round(float(np.mean([r["has_gold"] for r in rows])), 3),
            "fallbacks": int(sum(r["fallback"] for r in rows))}


def context_coverage(chain, questions) -> list[dict]:
    """How often the prompt's context holds a gold answer, by context size (no generation)."""
    out = []
    for k, chars in ((3, 600), (3, 1000), (5, 2000)):
        hit = 0
        for q, golds in questions:
            ctx = "".join(_ctx(chain, q, k, chars))
            hit += any(g.lower() in ctx.lower() for g in golds)
        out.append({"k": k, "max_context_chars": chars, "context_has_gold": round(hit / len(questions), 3)})
    return out


def _ctx(chain, q: str, k: int, chars: int) -> list[str]:
    from serve.chain import clip_context

    return clip_context(chain.kb.search(q, k), chars)


def weight_quality(llms: dict, prompts: list[list[dict]]) -> list[dict]:
    """Each loaded weight format, then int8 of every Linear layer, against fp32 on `prompts`
    (teacher-forced: top-1 agreement of next-token predictions, perplexity). Consumes the fp32 model."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    label = lambda llm: "int8" if llm.name.endswith("+int8") else str(next(llm.model.parameters()).dtype)[6:]  # noqa: E731
    models = {label(llm): llm for llm in llms.values()}
    if "float32" not in models or not prompts:
        return []
    ref_llm = models["float32"]
    ids = [ref_llm.inputs(m)["input_ids"] for m in prompts]

    def score(net) -> tuple[list, float]:
        tops, nll = [], 0.0
        with torch.inference_mode():
            for x in ids:
                lp = torch.log_softmax(net(input_ids=x).logits[0].float(), -1)
                tops.append(lp.argmax(-1))
                nll -= lp[:-1].gather(1, x[0, 1:, None]).sum().item()
                del lp
        return tops, nll

    n = sum(x.shape[1] for x in ids)
    ref, out = None, []
    names = ["float32"] + [k for k in models if k != "float32"] + ["int8_all"]
    for name in names:
        if name == "int8_all":  # every Linear layer, the fp32 copy quantized in place
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = quantize_dynamic(ref_llm.model, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                       dtype=torch.qint8, inplace=True)
        else:
            net = models[name].model
        tops, nll = score(net)
        ref = ref or tops
        agree = sum((a == b).sum().item() for a, b in zip(tops, ref))
        out.append({"weights": name, "top1_agreement_with_fp32": round(agree / n, 4),
                    "perplexity": round(float(np.exp(nll / (n - len(ids)))), 3), "tokens": n})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default="/tmp/kb_answer_latency", help="KB_HOME for the benchmark's KB")
    ap.add_argument("--kb", default="samples")
    ap.add_argument("--config", help="a config file (default: configs/default.yaml)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--limit", type=int, help="only the first N questions")
    ap.add_argument("--name", default="answer_latency_cpu")
    args = ap.parse_args(argv)
    os.environ["KB_HOME"] = args.home
    os.environ.setdefault("KB_MODELS__DIR", str(ROOT / "models"))  # the installed models, not beside --home

    import torch

    from kb.settings import load_settings
    from serve.chain import AnswerChain
    from serve.compliance import ReplyLibrary
    from serve.llm import LocalLLM, pick_backend

    base = load_settings(args.config)
    if pick_backend(base) != "local":
        raise SystemExit(f"no local LLM: models.llm {base.models.llm} is not installed (kb models install)")
    kb = open_kb(base, args.kb)
    library = ReplyLibrary.load(base.compliance.approved_replies, kb.embedder)
    questions = QUESTIONS[: args.limit] if args.limit else QUESTIONS
    names = [v for v in args.variants.split(",") if v]
    llms, chains, recs, load_s = {}, {}, {}, {}
    for name in names:
        s = load_settings(args.config, **VARIANTS[name])
        lkey = tuple(VARIANTS[name].get(k) for k in LLM_KEYS)
        if lkey not in llms:
            t = time.perf_counter()
            llms[lkey] = LocalLLM(s.models.llm, s)
            load_s[name] = round(time.perf_counter() - t, 2)
            print(f"loaded {llms[lkey].name} for {name} in {load_s[name]}s", flush=True)
        recs[name] = Recorder(llms[lkey], s.llm.prefix_cache)
        chains[name] = AnswerChain(s, kb, llm=recs[name], library=library)
        for w in WARMUP:
            list(chains[name].stream(w, mode="live"))
    rows: dict[str, list[dict]] = {n: [] for n in names}
    prompts, extra = [], {}
    cfg = base.model_dump(mode="json")
    load_before = os.getloadavg()

    def save(partial: bool) -> Path:
        return write_result(args.name, {
            "partial": partial,
            "config": {k: cfg[k] for k in ("models", "llm", "answer", "compliance")},
            "llm": next(iter(llms.values())).name, "variants": {n: VARIANTS[n] for n in names},
            "load_seconds": load_s, "torch_threads": torch.get_num_threads(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
            "loadavg_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
            "peak_rss_gib": round(peak_rss_gib(), 2),
            "summary": [{"variant": n, **summarize(rows[n])} for n in names if rows[n]], **extra,
            "per_question": rows})

    for i, (q, golds) in enumerate(questions):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            rows[name].append(ask_once(chains[name], recs[name], q, golds))
            if name == names[0] and recs[name].messages and i % 5 == 0:
                prompts.append(recs[name].messages)
        print(f"[{i + 1}/{len(questions)}] {q} " + " ".join(f"{n}={rows[n][-1]['seconds']}s" for n in names),
              flush=True)
        save(partial=True)
    summary = [{"variant": n, **summarize(rows[n])} for n in names]
    print(table(summary, ["variant", "p50_s", "p95_s", "ttft_p50_s", "ttft_p95_s", "model_ttft_p50_s",
                          "prompt_tokens_mean", "new_tokens_mean", "answer_has_gold", "fallbacks"]))
    extra["context_coverage"] = context_coverage(chains[names[0]], questions)
    print(table(extra["context_coverage"], ["k", "max_context_chars", "context_has_gold"]))
    save(partial=True)
    extra["weight_quality"] = weight_quality(llms, prompts)
    if extra["weight_quality"]:
        print(table(extra["weight_quality"], ["weights", "top1_agreement_with_fp32", "perplexity", "tokens"]))
    path = save(partial=False)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
