"""Next-sentence prediction: score adjacent units in batches, and train a head on a KB's text.

Two kinds of model, one interface (`continue_probs(pairs, temperature)`):
- `CrossNSPScorer`: a cross-encoder reading both units at once: a BERT with its next-sentence
  head (a pretrained one, e.g. bert-base-chinese, or one trained here), or a 2-label sequence
  classifier such as the shipped `model:nsp-e5` (e5-small + LoRA, ingest/nsp_cross.py), or a
  KB's adapter over one (`nsp_train.kind: cross`).
- `PairHeadScorer` (the default trained head): a 2-way linear head over the cosine of the frozen
  packaged encoder's mean-pooled embeddings of the two units and their lexical overlap
  (characters, words, length). Each unit is encoded once, not once per pair. On the
  packaged English MiniLM this learns what the cross head cannot on CPU (see README).

Convention (as in BERT pre-training): logit 0 = "B continues A", logit 1 = "B is random".
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.text import terms
from kb.cross_encoder import is_sequence_classifier
from kb.fsutil import building_dir, umask_mode
from kb.models import avoid_cudnn_attention, pick_device

log = logging.getLogger(__name__)

META_FILE = "nsp_meta.json"


class CrossNSPScorer:
    """P(next unit continues the previous) from a cross-encoder that reads both units at once,
    batched, on GPU when there is one. The folder holds a BERT with its next-sentence head, a
    2-label sequence classifier (e.g. `model:nsp-e5`; the label named "continues" in its config's
    id2label, else label 0, is "B continues A"), or a KB's adapter over one (`kb train-nsp`)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", max_seq_len: int = 128,
                 batch_size: int = 64) -> None:
        import torch

        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.tokenizer, self.model, self._flip = load_cross_nsp(self.model_dir)
        self.model.to(self.device).eval()
        if self.device.startswith("cuda"):
            self.model.half()
        avoid_cudnn_attention(self.device)
        self._torch = torch
        self.kind = "cross"

    def logits(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Raw NSP logits, shape (n, 2), in input order.

        All pairs are tokenized in one call (the Rust tokenizer's threads), sorted by length so a
        batch pads little, padded with numpy, and the logits stay on the device until the end:
        the GPU is not left waiting on Python between batches.
        """
        torch = self._torch
        if not pairs:
            return np.zeros((0, 2), dtype=np.float32)
        enc = self.tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first",
                             max_length=self.max_seq_len, padding=False)
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        order = np.argsort([len(x) for x in ids], kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        outs = []
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                width = max(len(ids[i]) for i in idx)
                arr = np.full((len(idx), width), pad, dtype=np.int64)
                tt = np.zeros((len(idx), width), dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.int64)
                for r, i in enumerate(idx):
                    n = len(ids[i])
                    arr[r, :n] = ids[i]
                    mask[r, :n] = 1
                    if types is not None:
                        tt[r, :n] = types[i]
                batch = {"input_ids": torch.from_numpy(arr), "attention_mask": torch.from_numpy(mask)}
                if types is not None:  # BERT; XLM-R's tokenizer gives none
                    batch["token_type_ids"] = torch.from_numpy(tt)
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                outs.append(self.model(**batch).logits.float())
        logits = torch.cat(outs).cpu().numpy()
        out = np.empty_like(logits)
        out[order] = logits[:, ::-1] if self._flip else logits
        return out

    def continue_probs(self, pairs: Sequence[tuple[str, str]], temperature: float = 1.0) -> np.ndarray:
        """softmax(logits / temperature)[:, 0]: the probability that B continues A."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        return continuation_prob(self.logits(pairs), temperature)


CONTINUE_LABELS = ("continues", "continue", "is_next", "isnext", "next")


def load_cross_nsp(model_dir: Path):
    """(tokenizer, model, flip): flip when the model's "continues" label is index 1."""
    from transformers import AutoConfig, AutoTokenizer

    from kb.cross_encoder import ASSET_META, load_merged, read_meta
    from kb.models import resolve_model

    if (model_dir / ASSET_META).is_file() and (model_dir / "adapter_config.json").is_file():
        base = resolve_model(read_meta(model_dir)["base"], "nsp base")
        model, tok, _ = load_merged(base, model_dir)
    else:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        cfg = AutoConfig.from_pretrained(str(model_dir))
        if is_sequence_classifier(cfg):
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
        else:
            from transformers import BertForNextSentencePrediction

            return tok, BertForNextSentencePrediction.from_pretrained(str(model_dir)), False
    if model.config.num_labels != 2:
        raise ValueError(f"{model_dir}: a next-sentence model needs 2 labels, it has {model.config.num_labels}")
    from kb.cross_encoder import label_index

    return tok, model, label_index(model.config, CONTINUE_LABELS) == 1


class PairHeadScorer:
    """The trained pair head over frozen-encoder and lexical features (see module docstring)."""

    def __init__(self, head_dir: str | Path, device: str = "auto", batch_size: int = 64,
                 encoder_dir: str | Path | None = None) -> None:
        import torch
        from safetensors.torch import load_file

        self.model_dir = Path(head_dir)
        meta = json.loads((self.model_dir / META_FILE).read_text())
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.encoder = PairFeatures(encoder_dir or meta["encoder"], self.device, batch_size)
        w = load_file(str(self.model_dir / "head.safetensors"))
        self.weight, self.bias = w["weight"].numpy(), w["bias"].numpy()
        self.mean, self.std = w["mean"].numpy(), w["std"].numpy()
        self.kind = "pair_head"
        self._torch = torch

    def logits(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        x = (self.encoder.features(pairs) - self.mean) / self.std
        return (x @ self.weight.T + self.bias).astype(np.float32)

    def continue_probs(self, pairs: Sequence[tuple[str, str]], temperature: float = 1.0) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        return continuation_prob(self.logits(pairs), temperature)


class PairFeatures:
    """Features of a pair of units: frozen mean-pooled embeddings and lexical overlap."""

    def __init__(self, encoder_dir: str | Path, device: str = "cpu", batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(encoder_dir), device=device)
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        uniq = sorted(set(texts))
        vecs = self.model.encode(uniq, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return dict(zip(uniq, vecs))

    def features(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        emb = self.embed([t for p in pairs for t in p])
        u = np.stack([emb[a] for a, _ in pairs])
        v = np.stack([emb[b] for _, b in pairs])
        lex = np.array([lexical_features(a, b) for a, b in pairs], dtype=np.float32)
        # the full u*v and |u-v| vectors overfit on a KB-sized sample (held-out 0.785 vs 0.809
        # for these six features on CMRC 2018, 5,000 pairs): cosine plus lexical overlap
        return np.hstack([(u * v).sum(1, keepdims=True), lex]).astype(np.float32)


def lexical_features(a: str, b: str) -> list[float]:
    """Overlap of content terms of two units, and their length ratio."""
    ta, tb = terms(a), terms(b)
    shared = len(ta & tb)
    return [shared / max(1, len(ta | tb)), shared / max(1, min(len(ta), len(tb))), float(shared > 0),
            min(shared, 5) / 5, min(len(a), len(b)) / max(1, len(a), len(b))]


def load_scorer_from(model_dir: str | Path, device: str = "auto", max_seq_len: int = 128,
                     batch_size: int = 64):
    """The scorer a model folder holds: a trained pair head, or a BERT with its NSP head."""
    meta_path = Path(model_dir) / META_FILE
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("kind") == "pair_head":
        return PairHeadScorer(model_dir, device, batch_size)
    return CrossNSPScorer(model_dir, device, max_seq_len, batch_size)


def continuation_prob(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax probability of class 0 (continuation) for each row of NSP logits, at `temperature`."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e[:, 0] / e.sum(axis=1)).astype(np.float32)


@dataclass
class NSPPair:
    a: str
    b: str
    label: int  # 0 = continues, 1 = not


def build_pairs(docs: Sequence[Sequence[Sequence[str]]], max_pairs: int, far_gap: int = 4,
                seed: int = 13, hard: float = 0.0,
                neighbours: dict[int, Sequence[int]] | None = None) -> list[NSPPair]:
    """Self-supervised pairs from documents → sections → units.

    Positives: adjacent units of one section. Negatives, as many: the first unit with a unit of
    another document (or, with a single document, one at least `far_gap` units away). With
    `hard` > 0 that share of negatives is hard: a unit of another section of the same document,
    else of one of the document's `neighbours` (e.g. its most similar documents).
    """
    rng = random.Random(seed)
    positives = [(d, s, sec[i], sec[i + 1]) for d, doc in enumerate(docs) for s, sec in enumerate(doc)
                 for i in range(len(sec) - 1)]
    rng.shuffle(positives)
    positives = positives[: max_pairs // 2]
    pairs = [NSPPair(a, b, 0) for _, _, a, b in positives]
    by_doc = {d: [u for sec in doc for u in sec] for d, doc in enumerate(docs)}
    by_doc = {d: us for d, us in by_doc.items() if us}
    doc_ids = sorted(by_doc)
    for d, s, a, _ in positives:
        b = _hard_negative(rng, docs, by_doc, d, s, neighbours) if hard and rng.random() < hard else None
        if b is not None:
            pairs.append(NSPPair(a, b, 1))
        elif len(doc_ids) > 1:  # a unit of another document, the document drawn first
            od = rng.choice(doc_ids[:-1])
            od = doc_ids[-1] if od == d else od
            pairs.append(NSPPair(a, rng.choice(by_doc[od]), 1))
        else:
            units = by_doc[d]
            i = units.index(a)
            far = [u for j, u in enumerate(units) if abs(j - i) >= far_gap]
            if far:
                pairs.append(NSPPair(a, rng.choice(far), 1))
    rng.shuffle(pairs)
    return pairs


def _hard_negative(rng: random.Random, docs: Sequence[Sequence[Sequence[str]]], by_doc: dict[int, list[str]],
                   d: int, s: int, neighbours: dict[int, Sequence[int]] | None) -> str | None:
    """A unit of another section of document `d`, else of a neighbour of `d`; None when neither."""
    others = [u for j, sec in enumerate(docs[d]) if j != s for u in sec]
    if others:
        return rng.choice(others)
    near = [n for n in (neighbours or {}).get(d, ()) if n != d and by_doc.get(n)]
    return rng.choice(by_doc[rng.choice(near)]) if near else None


def train_pair_head(pairs: list[NSPPair], encoder_dir: str | Path, out_dir: str | Path, *,
                    heldout: float = 0.15, c: float = 1.0, steps: int = 2000,
                    seed: int = 13, device: str = "auto", batch_size: int = 64,
                    progress: bool = True) -> dict:
    """Train the pair head (see module docstring) on `pairs`; save to `out_dir` atomically.

    The head is scikit-learn's L2 logistic regression (inverse strength `c`) on standardised
    features, stored as 2-way logits so the chunker's temperature applies as to a BERT NSP head.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if len(pairs) < 4:
        raise ValueError(f"too little text to train a next-sentence head ({len(pairs)} pairs)")
    t0 = time.perf_counter()
    dev = pick_device(device)
    feats = PairFeatures(encoder_dir, dev, batch_size)
    x = np.concatenate([feats.features([(p.a, p.b) for p in pairs[s : s + 512]])
                        for s in tqdm(range(0, len(pairs), 512), desc="NSP features",
                                      disable=not progress, unit="batch")])
    y = np.array([p.label for p in pairs])
    n_held = max(2, int(len(pairs) * heldout))
    xt, yt, xh, yh = x[n_held:], y[n_held:], x[:n_held], y[:n_held]
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=steps, random_state=seed).fit((xt - mean) / std, yt)
    pred = clf.predict((xh - mean) / std)
    loss = float(-np.mean(np.log(clf.predict_proba((xt - mean) / std)[np.arange(len(yt)), yt] + 1e-12)))
    # as 2-way logits [0, w.x + b]: softmax(.)[1] = sigmoid(w.x + b) = P(not next)
    weight = np.vstack([np.zeros_like(clf.coef_[0]), clf.coef_[0]]).astype(np.float32)
    bias = np.array([0.0, clf.intercept_[0]], dtype=np.float32)
    acc = float((pred == yh).mean())
    out = Path(out_dir)
    with building_dir(out, mode=umask_mode(0o777)) as tmp:
        save_file({"weight": torch.tensor(weight), "bias": torch.tensor(bias),
                   "mean": torch.tensor(mean), "std": torch.tensor(std)}, str(tmp / "head.safetensors"))
        meta = {"kind": "pair_head", "out": str(out), "pairs": len(pairs), "train_pairs": len(yt),
                "heldout_pairs": len(yh), "heldout_accuracy": round(acc, 4), "encoder": str(encoder_dir),
                "final_loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 2), "device": dev}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    log.info("NSP pair head: held-out accuracy %.3f on %d pairs -> %s", acc, len(yh), out)
    return meta


def train_nsp_head(pairs: list[NSPPair], encoder_dir: str | Path, out_dir: str | Path, *,
                   epochs: int = 1, batch_size: int = 32, lr: float = 1e-4, head_lr: float = 1e-3,
                   train_layers: int = 2, max_seq_len: int = 96, heldout: float = 0.15,
                   seed: int = 13, device: str = "auto", progress: bool = True,
                   extend_vocab: bool = True, reset_pooler: bool = True) -> dict:
    """Put a next-sentence head on `encoder_dir`, train it on `pairs`, save to `out_dir`.

    Only the top `train_layers` encoder layers, the pooler and the head learn (and the word
    embeddings when `extend_vocab` adds the characters the tokenizer maps to [UNK]: an English
    WordPiece vocabulary knows few Chinese characters). The model is written to a temporary folder
    and renamed into place. Returns {out, pairs, heldout_accuracy, ...}.
    """
    import torch
    from transformers import AutoTokenizer

    if len(pairs) < 4:
        raise ValueError(f"too little text to train a next-sentence head ({len(pairs)} pairs)")
    torch.manual_seed(seed)
    dev = pick_device(device)
    tok = AutoTokenizer.from_pretrained(str(encoder_dir))
    model = _nsp_model(encoder_dir, reset_pooler)
    added = add_unknown_chars(tok, model, (t for p in pairs for t in (p.a, p.b))) if extend_vocab else 0
    model.to(dev)
    groups = _param_groups(model, train_layers, bool(added), lr, head_lr)
    n_held = max(2, int(len(pairs) * heldout))
    test, train = pairs[:n_held], pairs[n_held:]

    def batches(items: list[NSPPair]):
        return _pair_batches(tok, items, batch_size, max_seq_len, dev)

    t0 = time.perf_counter()
    losses = _fit(model, groups, batches, train, epochs, math.ceil(len(train) / batch_size), seed, progress)
    acc = _accuracy(model, batches(test)) / len(test)
    out = Path(out_dir)
    meta = {
        "kind": "cross", "out": str(out), "pairs": len(pairs), "train_pairs": len(train), "heldout_pairs": len(test),
        "heldout_accuracy": round(acc, 4), "encoder": str(encoder_dir), "epochs": epochs,
        "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
        "seconds": round(time.perf_counter() - t0, 2), "device": dev, "added_tokens": added,
    }
    with building_dir(out, mode=umask_mode(0o777)) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    log.info("NSP head: held-out accuracy %.3f on %d pairs -> %s", acc, len(test), out)
    return meta


def _nsp_model(encoder_dir: str | Path, reset_pooler: bool):
    """A BERT next-sentence model on the encoder (its head new); with `reset_pooler` the pooler
    starts as the identity (a sentence-embedding encoder's pooler is untrained: near-constant)."""
    import torch
    from transformers import BertForNextSentencePrediction
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: cls.*" is the point here
    try:
        model = BertForNextSentencePrediction.from_pretrained(str(encoder_dir))
    finally:
        hf_logging.set_verbosity(verbosity)
    if reset_pooler:
        with torch.no_grad():
            model.bert.pooler.dense.weight.copy_(torch.eye(model.config.hidden_size))
            model.bert.pooler.dense.bias.zero_()
    return model


def _param_groups(model, train_layers: int, added: bool, lr: float, head_lr: float) -> list[dict]:
    """The optimizer's groups: head and pooler at `head_lr`; the top `train_layers` layers (and
    the word embeddings when characters were `added`) at `lr`; everything else frozen."""
    n_layers = model.config.num_hidden_layers
    trainable_layers = {f"bert.encoder.layer.{i}." for i in range(max(0, n_layers - train_layers), n_layers)}
    head, body = [], []
    for name, p in model.named_parameters():
        if name.startswith(("cls.", "bert.pooler.")):
            head.append(p)
        elif any(name.startswith(t) for t in trainable_layers) or train_layers >= n_layers or (
                added and name == "bert.embeddings.word_embeddings.weight"):
            body.append(p)
        else:
            p.requires_grad_(False)
    return [{"params": head, "lr": head_lr}] + ([{"params": body, "lr": lr}] if body else [])


def _pair_batches(tok, items: list[NSPPair], batch_size: int, max_seq_len: int, dev: str):
    """(encoded pairs, labels) of `items`, `batch_size` at a time, on `dev`."""
    import torch

    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        enc = tok([p.a for p in chunk], [p.b for p in chunk], truncation="longest_first",
                  max_length=max_seq_len, padding=True, return_tensors="pt").to(dev)
        yield enc, torch.tensor([p.label for p in chunk], device=dev)


def _fit(model, groups: list[dict], batches, train: list[NSPPair], epochs: int, steps_per_epoch: int, seed: int,
         progress: bool) -> list[float]:
    """AdamW with warm-up and linear decay, gradients clipped at 1, `train` shuffled each epoch;
    the losses of the steps."""
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, 1 - s / max(1, steps)))
    model.train()
    losses: list[float] = []
    bar = tqdm(total=steps, desc="train NSP head", disable=not progress, unit="step")
    rng = random.Random(seed)
    for _ in range(epochs):
        rng.shuffle(train)
        for enc, labels in batches(train):
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    return losses


def _accuracy(model, batches) -> int:
    """How many pairs of `batches` the model labels right."""
    import torch

    correct = 0
    with torch.inference_mode():
        for enc, labels in batches:
            correct += int((model(**enc).logits.argmax(-1) == labels).sum())
    return correct


def add_unknown_chars(tok, model, texts) -> int:
    """Add CJK characters the tokenizer maps to [UNK] as tokens; returns how many were added."""
    unk = tok.unk_token_id
    # CJK Unified Ideographs only: stable under the tokenizer's normalisation
    chars = {ch for t in texts for ch in t if "\u4e00" <= ch <= "\u9fff"}
    new = sorted(ch for ch in chars if tok.convert_tokens_to_ids(ch) == unk)
    if not new:
        return 0
    import torch

    old = len(tok)
    tok.add_tokens(new)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # distinct vectors as large as the known ones, so identity survives LayerNorm
        scale = emb[:old].std(dim=1).mean()
        emb[old:] = torch.randn(len(tok) - old, emb.shape[1], generator=torch.Generator().manual_seed(0)) * scale
    return len(new)
