"""Train the shipped reranker `rerank-e5` (kb/assets/rerank-e5) on CPU.

Data (the project may ship what these weights learnt from): the questions of the CMRC 2018 train
split (`eval.data.cmrc_split`: paragraphs i % 5 in (0, 1); CC BY-SA 4.0). Each question's group:
its own paragraph (positive) and two hard negatives among the other train paragraphs that do not
contain the answer, taken in turn from BM25's top hits (jieba tokens, as the KB's keyword search)
and e5-small's (query:/passage: prompts). A LoRA adapter on e5-small's top layers and a 1-logit
head learn listwise (finetune/rerank.py) on query + passage cut to 224 tokens, within a CPU-time
budget (15 minutes of 2 cores for the whole script); `kb models install rerank-e5` merges the asset.

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python scripts/train_rerank_e5.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kb  # noqa: E402,F401

CMRC = ROOT.parent / "shared" / "data" / "cmrc2018" / "cmrc2018_trial.json"
TRAINED_ON = ("CMRC 2018 trial, train-split questions and paragraphs "
              "(i % 5 in (0, 1), eval.data.cmrc_split; CC BY-SA 4.0)")


def hard_negative_groups(paragraphs: list, embedder: str, negatives: int, depth: int = 10) -> list:
    """(question, [own paragraph, hard negatives...]) for every question of `paragraphs`."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from kb.models import resolve_model
    from retrieval.keyword import KeywordIndex, tokenize

    texts = [p.context for p in paragraphs]
    bm25 = KeywordIndex.build([tokenize(t) for t in texts], list(range(len(texts))))
    model = SentenceTransformer(str(resolve_model(embedder, "embedder")), device="cpu")
    pv = model.encode(["passage: " + t for t in texts], batch_size=16, normalize_embeddings=True)
    questions = [(i, q) for i, p in enumerate(paragraphs) for q in p.questions]
    qv = model.encode(["query: " + q.question for _, q in questions], batch_size=32, normalize_embeddings=True)
    groups = []
    for (i, q), v in zip(questions, qv):
        ok = lambda j, i=i, q=q: j != i and not any(a in texts[j] for a in q.answers)  # noqa: E731
        kw = [j for j, _ in bm25.search(q.question, depth + 1) if ok(j)]
        vec = [int(j) for j in np.argsort(-(pv @ v))[: depth + 1] if ok(int(j))]
        picked: list[int] = []
        for pair in zip(kw + [None] * depth, vec):
            for j in pair:
                if j is not None and j not in picked:
                    picked.append(j)
        if len(picked) >= negatives:
            groups.append((q.question, [texts[i]] + [texts[j] for j in picked[:negatives]]))
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", default=str(CMRC))
    ap.add_argument("--base", default="model:e5-small", help="the encoder to train on (a spec or folder)")
    ap.add_argument("--base-spec", default="model:e5-small", help="how the asset names its base")
    ap.add_argument("--out", default=str(ROOT / "kb" / "assets" / "rerank-e5"))
    ap.add_argument("--negatives", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4, help="query groups per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--head-lr", type=float, default=3e-3)
    ap.add_argument("--max-length", type=int, default=224)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=4)
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--max-seconds", type=float, default=2400, help="wall-time cap of the training loop")
    ap.add_argument("--max-cpu-seconds", type=float, default=1440,
                    help="CPU-time budget (all threads) of the training loop, however busy the machine is")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--result", default=str(ROOT / "bench" / "results" / "rerank_e5_train.json"))
    a = ap.parse_args()

    from eval.data import cmrc_split
    from eval.report import provenance
    from finetune.rerank import train_reranker
    from kb.cross_train import FitConfig
    from kb.models import resolve_model
    from kb.settings import load_settings

    t0 = time.perf_counter()
    groups = hard_negative_groups(cmrc_split(a.squad)["train"], a.base, a.negatives)
    mined = time.perf_counter() - t0
    print(f"{len(groups)} query groups of 1 + {a.negatives} passages ({mined:.0f} s to mine)", file=sys.stderr)
    cfg = FitConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, head_lr=a.head_lr, max_length=a.max_length,
                    seed=a.seed, max_seconds=a.max_seconds,
                    max_cpu_seconds=a.max_cpu_seconds)
    meta = train_reranker(groups, resolve_model(a.base, "reranker base"), a.out, base_spec=a.base_spec, fit_cfg=cfg,
                          lora_r=a.lora_r, top_layers=a.top_layers, heldout=a.heldout, merge=False, device="cpu",
                          trained_on=TRAINED_ON, seed=a.seed)
    meta.pop("out", None)
    size = sum(f.stat().st_size for f in Path(a.out).iterdir())
    result = {"model": "rerank-e5", "asset": str(Path(a.out).relative_to(ROOT)), "asset_bytes": size,
              "mining_seconds": round(mined, 1), **meta, "provenance": provenance(load_settings())}
    Path(a.result).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("groups", "steps", "heldout_before", "heldout_after", "seconds",
                                             "asset_bytes")}))


if __name__ == "__main__":
    main()
