"""The fused LM head + loss under DeepSpeed ZeRO-3 (LoRA, frozen head): the same losses over three
steps as the unfused ZeRO-3 path and as training without DeepSpeed, and the same adapter. Each run
is a single-process gloo "cluster" on the CPU, in its own interpreter (DeepSpeed leaves a process
group and transformers' global ZeRO-3 config behind, which would change the tests that follow).
One rank: what a second rank adds (the gather across ranks) is not exercised here. The first run
JIT-builds DeepSpeed's shm comm op (ninja + a C++ compiler, about a minute; cached)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")]

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
import torch
from transformers import AutoTokenizer, TrainerCallback
from safetensors.torch import load_file
from finetune.sft import load_for_training, tokenize, train
from kb.settings import FinetuneConfig

model_dir, out, ds, fused, method = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4] == "1", sys.argv[5]
losses = []


class Losses(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            losses.append(logs["loss"])


tok = AutoTokenizer.from_pretrained(model_dir)
exs = [tokenize(tok, [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i} b c"}], 64)
       for i in range(12)]
cfg = FinetuneConfig(batch_size=4, grad_accum=1, max_length=64, logging_steps=1, fused_ce=fused, packing=False,
                     learning_rate=0.01, warmup_ratio=0.0, compile="off", deepspeed=ds)
cfg.lora.dropout = 0.0
torch.manual_seed(1)  # the LoRA A init
model = load_for_training(model_dir, method, "fp32", "cpu", cfg=cfg)
res = train(model, tok, exs, cfg, out, method=method, max_steps=3, save=True, progress=False, callbacks=[Losses()])
saved = load_file(f"{out}/adapter_model.safetensors") if method == "lora" else {}
torch.save(saved, f"{out}/adapter.pt")
print("RESULT" + json.dumps({"losses": losses, "fused_ce": res.kernels["fused_ce"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model_dir: Path, out: Path, *, zero3: bool, fused: bool, method: str = "lora") -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}
    if zero3:
        # one rank, no launcher: without these DeepSpeed falls back to MPI discovery (mpi4py)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    ds = str(ROOT / "configs" / "deepspeed" / "zero3.json") if zero3 else ""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), str(out), ds, "1" if fused else "0", method],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


def test_fused_loss_under_zero3_with_a_frozen_head(tiny_chat_llm_dir, tmp_path):
    import torch

    runs = {name: _run(tiny_chat_llm_dir, tmp_path / name, zero3=name != "plain", fused=name != "z3")
            for name in ("plain", "z3", "z3_fused")}
    assert runs["z3_fused"]["fused_ce"] and not runs["z3"]["fused_ce"]
    fused = runs["z3_fused"]["losses"]
    assert len(fused) == 3 and fused[0] > 1.0 and fused[2] < fused[0]  # three steps, and it learns
    assert fused == pytest.approx(runs["z3"]["losses"], rel=1e-4)
    assert fused == pytest.approx(runs["plain"]["losses"], rel=1e-4)
    a, b = (torch.load(tmp_path / name / "adapter.pt") for name in ("z3_fused", "z3"))
    assert a.keys() == b.keys() and any("lora_B" in k and v.abs().max() > 0 for k, v in a.items())
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-3, rtol=0)


def test_fused_loss_stays_off_under_zero3_for_a_trainable_head(tiny_chat_llm_dir, tmp_path):
    full = _run(tiny_chat_llm_dir, tmp_path / "full", zero3=True, fused=True, method="full")
    assert not full["fused_ce"] and full["losses"][0] > 1.0
