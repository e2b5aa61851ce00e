"""Training data from a knowledge base (`kb finetune data`).

- Question/answer pairs grounded in the KB's segments: written by the configured LLM when there
  is one, else by a cloze generator (a named entity, keyword or number in a sentence is replaced
  by a question word; the sentence is the answer).
- SFT examples in the answer chain's own prompt format (retrieved passages + question -> a cited
  answer), plus refusals (passages without the answer -> the refusal sentence), self-identity
  examples and a share of general instructions against forgetting.
- Embedding examples `{"query", "pos", "neg"}` with hard negatives mined from the KB's index:
  high-scoring passages from other segments that do not contain the answer.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.formats import Messages, load_conversations, to_prompt_response, write_jsonl
from ingest.sentences import is_chinese, split_sentences

log = logging.getLogger(__name__)

_NUM = re.compile(r"\d+(?:[.,]\d+)*\s*(?:年|月|日|%|万|亿|个|人|次|米|公里|元)?")

IDENTITY_Q_ZH = ["你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是哪家公司的助手？", "你能做什么？",
                 "你是人工智能吗？", "是谁开发了你？"]
IDENTITY_Q_EN = ["Who are you?", "What is your name?", "Introduce yourself, please.", "Which company do you work for?",
                 "What can you do?", "Are you an AI?", "Who made you?"]
IDENTITY_A_ZH = "我是{company}的智能客服助手{name}，根据{company}的资料回答您的问题。资料中没有的内容，我会如实告诉您。"
IDENTITY_A_EN = ("I'm {name}, {company}'s customer-service assistant. I answer from {company}'s documents, and "
                 "I tell you when they don't cover something.")


@dataclass
class QA:
    question: str
    answer: str
    span: str
    chunk_id: str
    doc_id: str
    passage: str


def cloze_questions(passage: str, terms: list[str], n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """Up to n (question, answer sentence, answer span) from a passage: a term or number in a
    sentence is replaced by a question word."""
    out = []
    sentences = [s for s in split_sentences(passage) if 8 <= len(s) <= 300]
    rng.shuffle(sentences)
    for sent in sentences:
        zh = is_chinese(sent)
        cands = [t for t in terms if len(t) > 1 and t in sent]
        nums = [m.group().strip() for m in _NUM.finditer(sent) if len(m.group().strip()) > 1 or not zh]
        if cands:
            span = max(cands, key=len)
            word = "什么" if zh else "what"
        elif nums:
            span = nums[0]
            if zh:
                word = "哪一年" if span.endswith("年") else "多少"
            else:
                word = "what year" if re.fullmatch(r"1\d{3}|20\d{2}", span) else "how many"
        else:
            continue
        q = sent.replace(span, word, 1).rstrip("。.!！；;，, ")
        q = (q + "？") if zh else (q[0].upper() + q[1:] + "?")
        if q.strip("？? ") and q != sent:
            out.append((q, sent, span))
        if len(out) >= n:
            break
    return out


def llm_questions(llm, passage: str, n: int) -> list[tuple[str, str, str]]:
    """Up to n (question, answer, span) written by the LLM; [] when its reply does not parse."""
    zh = is_chinese(passage)
    if zh:
        ask = (f"根据下面的资料写{n}个问题和答案，每行一个JSON：{{\"question\": ..., \"answer\": ...}}。"
               f"答案必须出自资料。\n\n资料：{passage}")
    else:
        ask = (f"Write {n} questions a customer could ask that the passage answers, one JSON per line: "
               f"{{\"question\": ..., \"answer\": ...}}. Answers must come from the passage.\n\nPassage: {passage}")
    out = []
    for line in llm.generate([{"role": "user", "content": ask}]).splitlines():
        try:
            row = json.loads(line.strip().strip(","))
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("question") and row.get("answer"):
            out.append((str(row["question"]), str(row["answer"]), str(row["answer"])))
    return out[:n]


def identity_examples(name: str, company: str) -> list[Messages]:
    """Identity conversations (who the assistant is) in Chinese and English for `name` of `company`."""
    zh = IDENTITY_A_ZH.format(name=name, company=company)
    en = IDENTITY_A_EN.format(name=name, company=company)
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": zh}] for q in IDENTITY_Q_ZH]
    rows += [[{"role": "user", "content": q}, {"role": "assistant", "content": en}] for q in IDENTITY_Q_EN]
    return rows


def build_training_data(settings, kb, out: str | Path, *, general: str | None = None, fmt: str = "messages",
                        embed_out: str | Path | None = None, progress: bool = True) -> dict:
    """Write SFT examples to `out` and embedding examples to `embed_out`; returns the counts."""
    from tqdm.auto import tqdm

    from serve.chain import AnswerChain
    from serve.injection import quote

    c = settings.finetune
    rng = random.Random(c.seed)
    chain = AnswerChain(settings, kb)
    with kb.store() as store:
        segments = [k for k in store.key_infos() if k["level"] == "segment" and k["raw_text"].strip()]
    if not segments:
        raise ValueError(f"knowledge base {kb.name!r} has no text to build training data from")
    qas: list[QA] = []
    for seg in tqdm(segments, desc="questions", unit="segment", disable=not progress):
        made = llm_questions(chain.llm, seg["raw_text"], c.questions_per_chunk) if chain.llm is not None else []
        if not made:
            made = cloze_questions(seg["raw_text"], [*seg.get("entities", []), *seg.get("keywords", [])],
                                   c.questions_per_chunk, rng)
        qas += [QA(q, a, span, seg["chunk_id"], seg["doc_id"], seg["raw_text"]) for q, a, span in made]
    if not qas:
        raise ValueError(f"no questions could be generated from {kb.name!r}")

    hits_all = []
    for s in tqdm(range(0, len(qas), 64), desc="retrieve", unit="batch", disable=not progress):
        hits_all += kb.search_many([qa.question for qa in qas[s : s + 64]], c.hard_negative_candidates)

    sft: list[Messages] = []
    pairs = []
    refusals = 0
    for qa, hits in zip(qas, hits_all):
        negs = [h.text for h in hits if h.chunk_id != qa.chunk_id and qa.span not in h.text
                and not (h.level == "article" and h.doc_id == qa.doc_id)
                and qa.passage not in h.text and h.text not in qa.passage]
        pairs.append({"query": qa.question, "pos": [qa.passage], "neg": negs[: c.hard_negatives]})
        if c.sft_style == "closed":
            sft.append([{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}])
            continue
        ctx = _with_positive(hits, settings.answer.k, qa, kb)
        n = next(i for i, h in enumerate(ctx) if holds_passage(h, qa)) + 1
        shown = chain.context(ctx)[n - 1]
        span = quote(qa.span)  # as the prompt shows passages (serve.injection.quote)
        clause = answer_clause(shown, span) if span and span in shown else quote(qa.answer)
        answer = cited_answer(qa.question, clause, n)
        sft.append([*chain.prompt(qa.question, ctx), {"role": "assistant", "content": answer}])
        if negs and rng.random() < c.refusal_share:
            wrong = [h for h in hits if h.text in negs][: settings.answer.k]
            refusal = {"role": "assistant", "content": chain.refusal(qa.question)}
            sft.append([*chain.prompt(qa.question, wrong), refusal])
            refusals += 1

    written = write_sft(settings, sft, out, fmt=fmt, general=general, rng=rng)
    embed_out = Path(embed_out) if embed_out else Path(out).with_name(Path(out).stem + ".embed.jsonl")
    write_jsonl(embed_out, pairs)
    return {**written, "domain": len(sft) - refusals, "refusals": refusals, "embed_out": str(embed_out),
            "embed_examples": len(pairs), "with_hard_negatives": sum(bool(p["neg"]) for p in pairs),
            "generator": "llm" if chain.llm is not None else "cloze"}


def write_sft(settings, sft: list[Messages], out: str | Path, *, fmt: str = "messages", general: str | None = None,
              rng: random.Random | None = None) -> dict:
    """Write the domain examples with the self-identity ones and a share of general instructions
    (`finetune.general_ratio`), shuffled; returns the counts."""
    c = settings.finetune
    rng = rng or random.Random(c.seed)
    identity = identity_examples(c.assistant_name, c.company)
    mixed: list[Messages] = []
    general = general or c.general_data
    if general:
        conv, problems = load_conversations(general)
        for p in problems:
            log.warning("%s", p)
        want = round(len(sft) * c.general_ratio)
        if want > len(conv):
            log.warning("general set has %d examples, %d wanted (general_ratio %.2f): using all",
                        len(conv), want, c.general_ratio)
        mixed = rng.sample(conv, min(want, len(conv)))
    rows = sft + identity + mixed
    rng.shuffle(rows)
    out = Path(out)
    write_jsonl(out, ({"messages": m} if fmt == "messages" else to_prompt_response(m) for m in rows))
    return {"out": str(out), "examples": len(rows), "identity": len(identity), "general": len(mixed)}


def holds_passage(hit, qa: QA) -> bool:
    """Whether a search hit is (or contains) the segment a question was made from: the segment
    itself, or the whole article it belongs to (short documents come back whole, chunk_id None)."""
    if hit.chunk_id is not None:
        return hit.chunk_id == qa.chunk_id
    return hit.doc_id == qa.doc_id and qa.passage in hit.text


def _with_positive(hits: list, k: int, qa: QA, kb) -> list:
    """The top-k passages with the answer's own segment among them (replacing the last); it is
    looked for among the candidates already retrieved before searching deeper."""
    top = hits[:k]
    if any(holds_passage(h, qa) for h in top):
        return top
    from retrieval.search import Hit

    own = next((h for h in hits[k:] if holds_passage(h, qa)), None)
    if own is None:
        own = next((h for h in kb.search(qa.question, 50) if holds_passage(h, qa)), None)
    if own is None:
        source = (kb.document(qa.doc_id) or {}).get("source", "")
        own = Hit(qa.chunk_id, qa.doc_id, source, qa.passage, {}, 0.0, "segment")
    return [*top[:-1], own] if top else [own]


_CLAUSE = re.compile(r"[^，,；;。！？!?\n]+")


def answer_clause(passage: str, span: str, max_chars: int = 60) -> str:
    """The clause of `passage` that holds `span` (the gold answer) as a short answer sentence, or
    the span alone when that clause is long or not found."""
    for sent in split_sentences(passage):
        if span not in sent:
            continue
        for m in _CLAUSE.finditer(sent):
            clause = m.group().strip()
            if span in clause and len(clause) <= max_chars:
                return clause
        break
    return span


def cited_answer(question: str, clause: str, n: int) -> str:
    """The answer chain's format: the answer, then its passage as [n]."""
    clause = clause.strip().rstrip("。.！!；;，,")
    return f"{clause}[{n}]。" if is_chinese(question) else f"{clause} [{n}]."


def question_examples(settings, kb, questions: list[tuple[str, list[str]]], *, shuffle_share: float = 0.5,
                      progress: bool = True) -> tuple[list[Messages], dict]:
    """SFT examples from real questions with gold answers, in the answer chain's own prompt: the
    passages the KB retrieves for the question; the target cites the first passage (as the chain
    shows it, truncated to its context budget) that holds a gold answer. Where none of the top k
    does, a deeper candidate holding it takes a random slot; where no candidate holds it, the
    target is the refusal. A `finetune.refusal_share` of questions also gets a refusal example on
    the retrieved passages without the answer. A `shuffle_share` of examples shows the passages in
    a random order, so that the cited number follows the answer, not the rank."""
    from tqdm.auto import tqdm

    from serve.chain import AnswerChain

    c, k = settings.finetune, settings.answer.k
    rng = random.Random(c.seed)
    quiet = settings.model_copy(update={"llm": settings.llm.model_copy(update={"backend": "extractive"})})
    chain = AnswerChain(quiet, kb)
    hits_all = []
    for s in tqdm(range(0, len(questions), 64), desc="retrieve", unit="batch", disable=not progress):
        hits_all += kb.search_many([q for q, _ in questions[s : s + 64]], c.hard_negative_candidates)
    rows: list[Messages] = []
    counts = {"answered": 0, "moved": 0, "refusals": 0, "extra_refusals": 0}
    for (question, answers), hits in zip(questions, hits_all):
        holds = lambda text, answers=answers: next((a for a in answers if a and a in text), None)  # noqa: E731
        ctx = list(hits[:k])
        if rng.random() < shuffle_share:  # the answer's passage is not always [1]: learn to find it
            rng.shuffle(ctx)
        texts = chain.context(ctx)
        slot = next((i for i, t in enumerate(texts) if holds(t)), None)
        if slot is None:
            deeper = next((h for h in hits[k:] if holds(chain.context([h])[0])), None)
            if deeper is not None and ctx:
                slot = rng.randrange(len(ctx))
                ctx = [*ctx[:slot], deeper, *ctx[slot + 1 :]]
                texts = chain.context(ctx)
                counts["moved"] += 1
        if slot is None or not holds(texts[slot]):
            rows.append([*chain.prompt(question, ctx), {"role": "assistant", "content": chain.refusal(question)}])
            counts["refusals"] += 1
            continue
        span = holds(texts[slot])
        target = cited_answer(question, answer_clause(texts[slot], span), slot + 1)
        rows.append([*chain.prompt(question, ctx), {"role": "assistant", "content": target}])
        counts["answered"] += 1
        without = [h for h in hits if not holds(chain.context([h])[0])][:k]
        if len(without) == k and rng.random() < c.refusal_share:
            rows.append([*chain.prompt(question, without), {"role": "assistant", "content": chain.refusal(question)}])
            counts["extra_refusals"] += 1
    return rows, counts
