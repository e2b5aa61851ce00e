"""The answer chain (langchain LCEL): condense → retrieve → prompt → generate → comply.

Each step is a method of `AnswerChain`, so it can be called and tested alone; `runnable` composes
them with `RunnablePassthrough.assign`, carrying one dict through. No question rewriting happens
beyond `answer.condense_history`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from ingest.nsp import terms
from ingest.sentences import is_chinese, split_sentences
from kb.settings import Settings
from retrieval.kb import KnowledgeBase
from serve.compliance import Compliance, ReplyLibrary, retrieval_confidence
from serve.llm import LLM, build_llm

SYSTEM_EN = ("You are a customer-service assistant. Answer only from the numbered context passages, "
             "briefly and precisely, and cite the passages you used as [n]. If the context does not "
             "contain the answer, reply exactly: {refusal}")
SYSTEM_ZH = ("你是客服助手。只根据下面编号的资料回答问题，简洁准确，并用[n]标注引用的资料。"
             "如果资料中没有答案，请只回答：{refusal}")
CONDENSE = ("Rewrite the last user question as a standalone question, using the conversation for "
            "context. Reply with the question only.")


class AnswerChain:
    def __init__(self, settings: Settings, kb: KnowledgeBase, llm: LLM | None = None,
                 library: ReplyLibrary | None = None) -> None:
        self.settings = settings
        self.kb = kb
        self.llm = llm if llm is not None else build_llm(settings)
        lib = library or ReplyLibrary.load(settings.compliance.approved_replies, kb.embedder)
        self.compliance = Compliance(settings.compliance, lib)

    # steps ----------------------------------------------------------------------------------------
    def refusal(self, question: str) -> str:
        a = self.settings.answer
        return a.refusal_zh if is_chinese(question) else a.refusal_en

    def condense(self, question: str, history: list[list[str]] | None) -> str:
        """A standalone question from a follow-up and the history (when configured)."""
        if not history or not self.settings.answer.condense_history:
            return question
        if self.llm is None:  # no model: carry the previous question's words into retrieval
            return f"{history[-1][0]} {question}"
        convo = "\n".join(f"user: {q}\nassistant: {a}" for q, a in history[-3:])
        return self.llm.generate([{"role": "system", "content": CONDENSE},
                                  {"role": "user", "content": f"{convo}\nuser: {question}"}]).strip() or question

    def retrieve(self, question: str) -> list:
        return self.kb.search(question, self.settings.answer.k)

    def confidence(self, question: str, hits: list) -> float:
        cover = float(self.kb.embedder.coverage([question])[0])
        return retrieval_confidence(question, hits, cover)

    def context(self, hits: list) -> list[str]:
        budget = self.settings.answer.max_context_chars
        out = []
        for h in hits:
            text = h.text[: max(0, budget)]
            budget -= len(text)
            out.append(text)
        return out

    def prompt(self, question: str, hits: list) -> list[dict[str, str]]:
        from langchain_core.prompts import ChatPromptTemplate

        system = (SYSTEM_ZH if is_chinese(question) else SYSTEM_EN).format(refusal=self.refusal(question))
        ctx = "\n\n".join(f"[{i + 1}] ({h.source}) {t}" for i, (h, t) in enumerate(zip(hits, self.context(hits))))
        tmpl = ChatPromptTemplate.from_messages([("system", "{system}"),
                                                 ("human", "Context:\n{context}\n\nQuestion: {question}")])
        msgs = tmpl.format_messages(system=system, context=ctx or "(none)", question=question)
        role = {"system": "system", "human": "user", "ai": "assistant"}
        return [{"role": role[m.type], "content": m.content} for m in msgs]

    def extract(self, question: str, hits: list) -> str:
        """Extractive answer: the sentences sharing most content terms with the question, cited."""
        q = terms(question)
        scored = []
        for i, (h, text) in enumerate(zip(hits, self.context(hits))):
            for j, s in enumerate(split_sentences(text)):
                overlap = len(q & terms(s)) / max(1, len(q))
                if overlap > 0:
                    scored.append((overlap, -i, -j, s, i + 1))
        if not scored:
            return self.refusal(question)
        scored.sort(reverse=True)
        best = scored[:1]
        for cand in scored[1:]:  # more sentences only when nearly as well supported, and not questions
            if len(best) >= self.settings.answer.extractive_sentences:
                break
            if cand[0] >= 0.75 * best[0][0] and not cand[3].rstrip().endswith(("?", "？")):
                best.append(cand)
        joiner = "" if is_chinese(question) else " "
        return joiner.join(f"{s} [{n}]" for _, _, _, s, n in sorted(best, key=lambda b: (-b[1], -b[2])))

    def generate(self, question: str, hits: list, messages: list[dict[str, str]]) -> str:
        if self.llm is None:
            return self.extract(question, hits)
        return self.llm.generate(messages)

    def is_refusal(self, question: str, draft: str) -> bool:
        ref = self.refusal(question)
        norm = lambda s: re.sub(r"\W+", "", s.lower())  # noqa: E731
        return norm(ref) in norm(draft) or norm(draft) == ""

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        q, hits, draft = state["standalone"], state["hits"], state["draft"]
        verdict = self.compliance.check(q, draft, self.context(hits), state["confidence"],
                                        refused=self.is_refusal(q, draft), extractive=self.llm is None,
                                        stage=state.get("stage"))
        return {"answer": verdict.answer, "sources": [h.to_json() for h in hits], "fallback": verdict.fallback,
                "reason": verdict.reason, "standalone_question": q, "confidence": round(state["confidence"], 4),
                "draft": draft, "approved_match": verdict.approved_match,
                "mode": "extractive" if self.llm is None else self.llm.name}

    # composition ----------------------------------------------------------------------------------
    @property
    def runnable(self):
        from langchain_core.runnables import RunnableLambda, RunnablePassthrough

        return (RunnablePassthrough.assign(standalone=RunnableLambda(lambda s: self.condense(s["question"], s.get("history"))))
                | RunnablePassthrough.assign(hits=RunnableLambda(lambda s: self.retrieve(s["standalone"])))
                | RunnablePassthrough.assign(confidence=RunnableLambda(lambda s: self.confidence(s["standalone"], s["hits"])),
                                             messages=RunnableLambda(lambda s: self.prompt(s["standalone"], s["hits"])))
                | RunnablePassthrough.assign(draft=RunnableLambda(lambda s: self.generate(s["standalone"], s["hits"], s["messages"])))
                | RunnableLambda(self.finish))

    def ask(self, question: str, history: list[list[str]] | None = None, stage: str | None = None) -> dict:
        t0 = time.perf_counter()
        out = self.runnable.invoke({"question": question, "history": history or [], "stage": stage})
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out

    def stream(self, question: str, history: list[list[str]] | None = None, stage: str | None = None,
               piece: int = 24) -> Iterator[str | dict]:
        """Text pieces of the checked answer, then the full result dict.

        The answer is checked by compliance before any of it is sent (a customer never sees a
        reply that is then withdrawn); it is then sent in pieces.
        """
        result = self.ask(question, history, stage)
        text = result["answer"]
        for i in range(0, len(text), piece):
            yield text[i : i + piece]
        yield result
