"""Multiple-choice evaluation on CMMLU/C-Eval CSVs (`,Question,A,B,C,D,Answer`).

Three scorers (`auto` picks the first that the configuration allows):
- `loglik` (default): the model's log-probability of each answer letter right after the prompt,
  batched (left padding with explicit position ids, only the last position's logits kept);
- `generate`: the model (local or an OpenAI-compatible endpoint) writes an answer, the letter is
  parsed from it; unparseable answers count as wrong and are reported;
- `embed`: no LLM, the embedder's similarity between question (with context) and each option.

k-shot examples come from the `dev` split beside `test`; with a knowledge base the prompt also
holds the top retrieved passages (retrieval-augmented mode), to measure what the KB adds.
"""

from __future__ import annotations

import csv
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

LETTERS = ("A", "B", "C", "D")
HEADER_ZH = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n"


@dataclass
class ChoiceItem:
    subject: str
    line: int
    question: str
    options: dict[str, str]
    answer: str
    context: list[str] = field(default_factory=list)

    def body(self) -> str:
        opts = "".join(f"{L}. {self.options[L]}\n" for L in LETTERS)
        ctx = "".join(f"资料{i + 1}：{c}\n" for i, c in enumerate(self.context))
        return f"{ctx}题目：{self.question}\n{opts}答案："


def _csv_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise FileNotFoundError(f"no .csv files in {path}")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"no such file or folder: {path}")


def load_choice(path: str | Path) -> tuple[list[ChoiceItem], list[str]]:
    """Questions and problems; a malformed row is named by file and line and skipped."""
    items, problems = [], []
    for f in _csv_files(Path(path)):
        subject = f.stem
        with f.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            cols = {c.strip() if c else "" for c in reader.fieldnames or []}
            missing = [c for c in ("Question", *LETTERS, "Answer") if c not in cols]
            if missing:
                problems.append(f"{f.name}:1: skipped the file (missing columns {', '.join(missing)})")
                continue
            for row in reader:
                line = reader.line_num
                row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
                answer = row.get("Answer", "").upper()
                empty = [c for c in ("Question", *LETTERS) if not row.get(c)]
                if empty:
                    problems.append(f"{f.name}:{line}: skipped (empty {', '.join(empty)})")
                elif answer not in LETTERS:
                    problems.append(f"{f.name}:{line}: skipped (answer {row.get('Answer', '')!r} is not one of A-D)")
                else:
                    items.append(ChoiceItem(subject, line, row["Question"], {L: row[L] for L in LETTERS}, answer))
    return items, problems


def dev_folder(path: str | Path) -> Path | None:
    """The `dev` split beside a `test` folder (or beside the folder holding a test file)."""
    p = Path(path).resolve()
    folder = p if p.is_dir() else p.parent
    dev = folder.parent / "dev"
    return dev if folder.name == "test" and dev.is_dir() else None


def build_prompt(item: ChoiceItem, shots: Sequence[ChoiceItem]) -> str:
    """The few-shot prompt: the subject header, the answered `shots`, then `item` awaiting its answer letter."""
    subject = item.subject.replace("_", " ")
    examples = "".join(f"{s.body()}{s.answer}\n\n" for s in shots)
    return HEADER_ZH.format(subject=subject) + examples + item.body()


_PATTERNS = [re.compile(p) for p in (
    r"答案\s*(?:是|为|应该是|应为|选)?\s*[：:]?\s*\(?([A-D])(?![A-Za-z])",
    r"(?:选|选择|[Cc]hoose|[Aa]nswer is|[Aa]nswer:)\s*\(?([A-D])(?![A-Za-z])",
    r"^\s*\(?([A-D])(?:[\s.。．:：)、]|$)",
    r"(?<![A-Za-z])([A-D])(?![A-Za-z])",
)]


def parse_choice(text: str) -> str | None:
    """The answer letter in a model's free-text reply, or None."""
    for pat in _PATTERNS:
        m = pat.search(text)
        if m:
            return m.group(1)
    return None


class LoglikScorer:
    """Log-probabilities of the answer letters at the end of each prompt, batched."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 2048, chat: bool = False) -> None:
        self.model, self.tok = model, tokenizer
        limit = getattr(model.config, "max_position_embeddings", None) or max_length
        self.batch_size, self.max_length, self.chat = batch_size, min(max_length, limit), chat
        self.device = next(model.parameters()).device
        self.letter_ids = [self._letter_ids(L) for L in LETTERS]

    def _letter_ids(self, letter: str) -> list[int]:
        ids = {self.tok(v, add_special_tokens=False)["input_ids"][-1] for v in (letter, " " + letter)}
        return sorted(ids)

    def _encode(self, prompt: str) -> list[int]:
        if self.chat and getattr(self.tok, "chat_template", None):
            prompt = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tok(prompt, add_special_tokens=not self.chat)["input_ids"]
        return ids[-self.max_length:]  # keep the end: the question and "答案："

    def scores(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        """[n, 4] log-probabilities of A-D (each letter: log-sum over its token variants)."""
        import torch
        from tqdm.auto import tqdm

        enc = [self._encode(p) for p in prompts]
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))  # similar lengths per batch
        out = np.zeros((len(enc), len(LETTERS)), dtype=np.float32)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.tok.eos_token_id or 0)
        bar = tqdm(total=len(enc), desc="eval choice", unit="q", disable=not progress)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends at the last column
                ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                mask[r, width - len(enc[i]):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device), logits_to_keep=1).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            for c, lids in enumerate(self.letter_ids):
                out[idx, c] = torch.logsumexp(logp[:, lids], -1).cpu().numpy()
            bar.update(len(idx))
        bar.close()
        return out


def embed_scores(embedder, items: Sequence[ChoiceItem]) -> np.ndarray:
    """[n, 4] cosine similarity of (context + question) with each option: a no-LLM baseline."""
    q = embedder.encode_queries(["\n".join([*it.context, it.question]) for it in items])
    o = embedder.encode_passages([it.options[L] for it in items for L in LETTERS]).reshape(len(items), len(LETTERS), -1)
    return np.einsum("nd,nkd->nk", q, o)


def attach_context(items: Sequence[ChoiceItem], kb, k: int, max_chars: int) -> None:
    """Retrieval-augmented mode: the top-k passages for each question go into its prompt."""
    from serve.chain import clip_context

    for it, hits in zip(items, kb.search_many([it.question for it in items], k)):
        it.context = [text for text in clip_context(hits, max_chars) if text]


def evaluate_choice(items: Sequence[ChoiceItem], predict: Callable[[list[ChoiceItem]], list[str | None]],
                    *, problems: Sequence[str] = (), meta: dict | None = None) -> dict:
    """Accuracy overall and per subject; `predict` returns a letter (or None) per item."""
    t0 = time.perf_counter()
    preds = predict(list(items))
    seconds = time.perf_counter() - t0
    per_subject: dict[str, dict] = {}
    per_q = []
    for it, p in zip(items, preds):
        ok = p == it.answer
        s = per_subject.setdefault(it.subject, {"n": 0, "correct": 0})
        s["n"] += 1
        s["correct"] += ok
        per_q.append({"subject": it.subject, "line": it.line, "answer": it.answer, "pred": p, "correct": ok})
    for s in per_subject.values():
        s["accuracy"] = round(s["correct"] / s["n"], 4)
    n = len(per_q)
    correct = sum(q["correct"] for q in per_q)
    return {"accuracy": round(correct / n, 4) if n else 0.0, "n": n, "correct": correct,
            "chance": 1 / len(LETTERS), "per_subject": dict(sorted(per_subject.items())),
            "predicted": dict(sorted(Counter(str(q["pred"]) for q in per_q).items())),
            "gold": dict(sorted(Counter(q["answer"] for q in per_q).items())),
            "unparsed": sum(q["pred"] is None for q in per_q), **(meta or {}),
            "seconds": round(seconds, 2), "questions_per_s": round(n / seconds, 2) if seconds else None,
            "skipped_rows": list(problems), "per_question": per_q}


def run_choice(settings, items: Sequence[ChoiceItem], *, problems: Sequence[str] = (),
               dev: Sequence[ChoiceItem] = (), shots: int = 0, mode: str = "auto", kb=None,
               chat: bool = False, progress: bool = True) -> dict:
    """Evaluate the configured model (models.llm + llm.adapter, or the endpoint) on `items`."""
    e = settings.eval
    items = [replace(it, context=[]) for it in items]
    by_subject: dict[str, list[ChoiceItem]] = {}
    for d in dev:
        by_subject.setdefault(d.subject, []).append(d)
    if shots and any(len(by_subject.get(it.subject, [])) < shots for it in items):
        short = sorted({it.subject for it in items if len(by_subject.get(it.subject, [])) < shots})
        raise ValueError(f"the dev split has fewer than {shots} examples for: {', '.join(short)}")
    if kb is not None:
        attach_context(items, kb, e.choice_context_k, e.choice_context_chars)
    prompt = {id(it): build_prompt(it, by_subject.get(it.subject, [])[:shots]) for it in items}
    if mode == "auto":  # what is configured: an endpoint, a local model (installed), or no LLM at all
        from serve.llm import pick_backend

        mode = {"local": "loglik", "openai": "generate"}.get(pick_backend(settings), "embed")
    meta = {"mode": mode, "shots": shots, "kb": kb.name if kb is not None else None}

    if mode == "embed":
        from retrieval.knowledge_base import shared_embedder

        emb = kb.embedder if kb is not None else shared_embedder(
            settings.models.embedder, settings.models.device, settings.retrieval.embed_batch_size)
        meta["model"] = f"embedder:{settings.models.embedder}"
        predict = lambda its: [LETTERS[int(i)] for i in embed_scores(emb, its).argmax(1)]  # noqa: E731
    elif mode == "loglik":
        from serve.llm import LocalLLM

        if not settings.models.llm:
            raise ValueError("the log-likelihood scorer needs a local model: set models.llm (or KB_MODELS__LLM); "
                             "for an OpenAI-compatible endpoint use --mode generate, without an LLM --mode embed")
        llm = LocalLLM(settings.models.llm, settings)
        meta["model"] = llm.name  # names the adapter when one was applied (serve.llm.LocalLLM)
        scorer = LoglikScorer(llm.model, llm.tokenizer, e.choice_batch_size, e.choice_max_length, chat)
        predict = lambda its: [LETTERS[int(i)] for i in  # noqa: E731
                               scorer.scores([prompt[id(it)] for it in its], progress).argmax(1)]
    elif mode == "generate":
        from tqdm.auto import tqdm

        from serve.llm import build_llm

        llm = build_llm(settings)
        if llm is None:
            raise ValueError("--mode generate needs an LLM: set models.llm or llm.openai_base_url")
        meta["model"] = llm.name
        predict = lambda its: [parse_choice(llm.generate([{"role": "user", "content": prompt[id(it)]}]))  # noqa: E731
                               for it in tqdm(its, desc="eval choice", unit="q", disable=not progress)]
    else:
        raise ValueError(f"unknown mode {mode!r} (auto, loglik, generate, embed)")
    return evaluate_choice(items, predict, problems=problems, meta=meta)


def write_report(result: dict, path: str) -> None:
    """Write the HTML report (summary, accuracy per subject, gold vs predicted letters, skipped rows) and its JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.report import figure_png, html_table, img, write_html

    subj = result["per_subject"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(subj), [s["accuracy"] for s in subj.values()], color="#4a7ab5")
    ax.axvline(result["chance"], color="#c44", ls="--", label=f"chance {result['chance']:.2f}")
    ax.axvline(result["accuracy"], color="#333", ls=":", label=f"overall {result['accuracy']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.legend(loc="lower right")
    ax.set_title(f"Accuracy per subject (n={result['n']})")
    fig2, ax2 = plt.subplots(figsize=(5, 3))
    keys = [*LETTERS, "None"]
    x = np.arange(len(keys))
    ax2.bar(x - 0.2, [result["gold"].get(k, 0) for k in keys], 0.4, label="gold")
    ax2.bar(x + 0.2, [result["predicted"].get(k, 0) for k in keys], 0.4, label="predicted")
    ax2.set_xticks(x, keys)
    ax2.legend()
    ax2.set_title("Answer letters: gold vs predicted")
    summary = {k: v for k, v in result.items() if not isinstance(v, list | dict)}
    rows = [{"subject": k, **v} for k, v in subj.items()]
    write_html(path, "Multiple-choice evaluation",
               [("Summary", html_table([summary])), ("Per subject", html_table(rows) + img(figure_png(fig))),
                ("Answer letters", img(figure_png(fig2))),
                ("Skipped rows", html_table([{"problem": p} for p in result["skipped_rows"]]))], result)
