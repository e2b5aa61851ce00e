"""Train the shipped next-sentence cross-encoder `nsp-e5` (kb/assets/nsp-e5) on CPU.

Data (the project may ship what these weights learnt from): the CMRC 2018 train split
(`eval.data.cmrc_split`: paragraphs i % 5 in (0, 1); CC BY-SA 4.0) and the sample documents
`samples/docs/` (Apache-2.0). Positives are adjacent units of one paragraph or section (the
chunker's own units: `ingest.chunking.to_units`); negatives, as many, pair the unit with a unit
of another paragraph: 70% at random, 30% hard (another section of the same document, or one of
the paragraph's five most similar train paragraphs by shared terms: CMRC's articles have one
paragraph each). A LoRA adapter on e5-small's top layers and a 2-label head learn; the asset is
a few MB and `kb models install nsp-e5` merges it onto e5-small.

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python scripts/train_nsp_e5.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kb  # noqa: E402,F401

CMRC = ROOT.parent / "shared" / "data" / "cmrc2018" / "cmrc2018_trial.json"
from eval.segment_eval import HARD_SHARE  # noqa: E402

TRAINED_ON = ("CMRC 2018 trial, train split (paragraphs i % 5 in (0, 1), eval.data.cmrc_split; CC BY-SA 4.0) "
              "and samples/docs (Apache-2.0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", default=str(CMRC))
    ap.add_argument("--samples", default=str(ROOT / "samples" / "docs"))
    ap.add_argument("--base", default="model:e5-small", help="the encoder to train on (a spec or folder)")
    ap.add_argument("--base-spec", default="model:e5-small", help="how the asset names its base")
    ap.add_argument("--out", default=str(ROOT / "kb" / "assets" / "nsp-e5"))
    ap.add_argument("--max-pairs", type=int, default=2400)
    ap.add_argument("--hard", type=float, default=HARD_SHARE)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--head-lr", type=float, default=3e-3)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--top-layers", type=int, default=4)
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--max-seconds", type=float, default=1800, help="wall-time cap of the training loop")
    ap.add_argument("--max-cpu-seconds", type=float, default=1080,
                    help="CPU-time budget (all threads): 10 minutes of 2 cores, however busy the machine is")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--result", default=str(ROOT / "bench" / "results" / "nsp_e5_train.json"))
    a = ap.parse_args()

    from eval.report import provenance
    from eval.segment_eval import nsp_training_docs
    from ingest.nsp import META_FILE, build_pairs
    from ingest.nsp_cross import train_cross_nsp
    from kb.cross_train import FitConfig
    from kb.models import resolve_model
    from kb.settings import load_settings

    settings = load_settings()
    docs, near = nsp_training_docs(a.squad, a.samples or None, settings)
    pairs = build_pairs(docs, a.max_pairs, settings.nsp_train.far_gap, a.seed, hard=a.hard, neighbours=near)
    print(f"{len(docs)} documents, {len(pairs)} pairs", file=sys.stderr)
    cfg = FitConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, head_lr=a.head_lr, max_length=a.max_length,
                    seed=a.seed, max_seconds=a.max_seconds,
                    max_cpu_seconds=a.max_cpu_seconds)
    meta = train_cross_nsp(pairs, resolve_model(a.base, "nsp base"), a.out, base_spec=a.base_spec, fit_cfg=cfg,
                           lora_r=a.lora_r, top_layers=a.top_layers, heldout=a.heldout, device="cpu",
                           trained_on=TRAINED_ON)
    (Path(a.out) / META_FILE).unlink()  # the asset's cross_encoder.json says it all; no local paths shipped
    meta.pop("out", None)
    size = sum(f.stat().st_size for f in Path(a.out).iterdir())
    result = {"model": "nsp-e5", "asset": str(Path(a.out).relative_to(ROOT)), "asset_bytes": size,
              "documents": len(docs), "cmrc_paragraphs": len(near), "hard_share": a.hard, **meta,
              "provenance": provenance(settings)}
    Path(a.result).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("pairs", "steps", "heldout_accuracy", "seconds", "asset_bytes")}))


if __name__ == "__main__":
    main()
