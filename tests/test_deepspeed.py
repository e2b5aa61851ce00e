"""The fused LM head + loss under DeepSpeed ZeRO-3 (LoRA, frozen head): the same first loss as the
unfused ZeRO-3 path and as training without DeepSpeed, and the LoRA weights move. Each run is a
single-process gloo "cluster" on the CPU, in its own interpreter (DeepSpeed leaves a process group
and transformers' global ZeRO-3 config behind, which would change the tests that follow).
The first run JIT-builds DeepSpeed's shm comm op (ninja + a C++ compiler, about a minute; cached)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import torch
from transformers import AutoTokenizer
from safetensors.torch import load_file
from finetune.sft import load_for_training, tokenize, train
from kb.settings import FinetuneConfig

model_dir, out, ds, fused, method = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4] == "1", sys.argv[5]
tok = AutoTokenizer.from_pretrained(model_dir)
exs = [tokenize(tok, [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i} b c"}], 64)
       for i in range(8)]
cfg = FinetuneConfig(batch_size=4, grad_accum=1, max_length=64, logging_steps=1, fused_ce=fused, packing=False,
                     learning_rate=0.01, warmup_ratio=0.0, compile="off", deepspeed=ds)
cfg.lora.dropout = 0.0
torch.manual_seed(1)  # the LoRA A init
model = load_for_training(model_dir, method, "fp32", "cpu", cfg=cfg)
res = train(model, tok, exs, cfg, out, method=method, max_steps=1, save=True, progress=False)
saved = load_file(f"{out}/adapter_model.safetensors") if method == "lora" else {}
lora_b = max((v.abs().max().item() for k, v in saved.items() if "lora_B" in k), default=0)
print("RESULT" + json.dumps({"first_loss": res.first_loss, "fused_ce": res.kernels["fused_ce"], "lora_b": lora_b}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model_dir: Path, out: Path, *, zero3: bool, fused: bool, method: str = "lora") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           # one rank, no launcher: without these DeepSpeed falls back to MPI discovery (mpi4py)
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    if not zero3:
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(k)
    ds = str(ROOT / "configs" / "deepspeed" / "zero3.json") if zero3 else ""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), str(out), ds, "1" if fused else "0", method],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


def test_fused_loss_under_zero3_with_a_frozen_head(tiny_chat_llm_dir, tmp_path):
    plain = _run(tiny_chat_llm_dir, tmp_path / "plain", zero3=False, fused=False)
    z3 = _run(tiny_chat_llm_dir, tmp_path / "z3", zero3=True, fused=False)
    z3_fused = _run(tiny_chat_llm_dir, tmp_path / "z3_fused", zero3=True, fused=True)
    assert z3_fused["fused_ce"] and not z3["fused_ce"]
    assert z3_fused["first_loss"] > 1.0
    assert z3_fused["first_loss"] == pytest.approx(z3["first_loss"], rel=1e-4)
    assert z3_fused["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-4)
    assert z3_fused["lora_b"] > 0  # LoRA B starts at zero: the step reached the adapter


def test_fused_loss_stays_off_under_zero3_for_a_trainable_head(tiny_chat_llm_dir, tmp_path):
    full = _run(tiny_chat_llm_dir, tmp_path / "full", zero3=True, fused=True, method="full")
    assert not full["fused_ce"] and full["first_loss"] > 1.0
