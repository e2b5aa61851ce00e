"""Multi-GPU fine-tuning through the same entry point (`kb finetune llm`) under torchrun, with
plain DDP and with the DeepSpeed ZeRO configs in configs/deepspeed/.

`prepare` writes a random-weight model of the Qwen2.5-0.5B shape (Llama architecture, so the
packaged WordPiece tokenizer loads as itself) and SFT conversations of varied length; each
launch then prints the `kb finetune llm --json` result, and `collect` gathers them:

    python -m bench.finetune_dist prepare --out /tmp/dist
    torchrun --nproc_per_node 2 -m cli finetune llm --data /tmp/dist/data.jsonl --model /tmp/dist/model \\
        --out /tmp/dist/zero2 --max-steps 30 --json -q --deepspeed configs/deepspeed/zero2.json > zero2.json
    python -m bench.finetune_dist collect --name finetune_dist_gpu ddp.json zero2.json ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.common import table, write_result
from finetune.formats import CHATML_TEMPLATE


def prepare(out: Path, tokenizer: str, n: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bench.generate import SHAPES

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    tok.chat_template = CHATML_TEMPLATE
    dims = {k: v for k, v in SHAPES["0.5b"].items() if k != "vocab_size"}
    cfg = LlamaConfig(**dims, vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    rng = random.Random(0)
    words = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2][:5000]
    with (out / "data.jsonl").open("w") as fh:
        for _ in range(n):
            q = " ".join(rng.choices(words, k=rng.randint(40, 600)))
            a = " ".join(rng.choices(words, k=rng.randint(10, 200)))
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            fh.write(json.dumps({"messages": messages}) + "\n")


def collect(name: str, files: list[str]) -> None:
    runs = []
    for f in files:
        lines = [ln for ln in Path(f).read_text().splitlines() if ln.startswith("{")]
        if not lines:
            runs.append({"setting": Path(f).stem, "error": "no result (see the log)"})
            continue
        r = json.loads(lines[-1])
        runs.append({"setting": Path(f).stem, "method": r["method"], "gpus": r.get("world_size"),
                     "tokens_per_s": r["tokens_per_s"], "peak_mem_gib_per_gpu": r["peak_mem_gib"],
                     "steps": r["steps"], "train_loss": r["train_loss"]})
    path = write_result(name, {"runs": runs, "model": "Qwen2.5-0.5B shape (Llama architecture), random bf16 weights"})
    print(table(runs, ["setting", "method", "gpus", "tokens_per_s", "peak_mem_gib_per_gpu", "steps", "train_loss"]))
    print(f"-> {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=".gpu/minilm_tok")
    p.add_argument("-n", type=int, default=2000)
    c = sub.add_parser("collect")
    c.add_argument("--name", default="finetune_dist_gpu")
    c.add_argument("files", nargs="+")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out), args.tokenizer, args.n)
    else:
        collect(args.name, args.files)


if __name__ == "__main__":
    main()
