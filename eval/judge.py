"""LLM-as-judge: a configured model grades an answer against the gold answer, 1-5, scaled to 0-1."""

from __future__ import annotations

import re
from collections.abc import Sequence

from kb.settings import Settings

PROMPT = ("You grade answers of a customer-service assistant. Compare the answer with the reference "
          "answer for the question and reply with one integer from 1 (wrong or missing) to 5 (correct "
          "and complete), nothing else.\n\nQuestion: {question}\nReference answer: {gold}\nAnswer: {answer}\n\nGrade:")


class Judge:
    def __init__(self, llm) -> None:
        self.llm = llm

    def grade(self, question: str, golds: Sequence[str], answer: str) -> float | None:
        reply = self.llm.generate([{"role": "user", "content": PROMPT.format(
            question=question, gold=" / ".join(golds), answer=answer)}])
        m = re.search(r"[1-5]", reply)
        return (int(m.group()) - 1) / 4 if m else None


def build_judge(settings: Settings) -> Judge | None:
    """The judge from eval.judge_* settings (an OpenAI-compatible endpoint or a local model)."""
    from serve.llm import LocalLLM, OpenAICompatibleLLM

    e = settings.eval
    if e.judge_openai_base_url:
        llm_cfg = settings.llm.model_copy(update={"openai_base_url": e.judge_openai_base_url,
                                                  "openai_model": e.judge_openai_model,
                                                  "openai_api_key_env": e.judge_api_key_env})
        return Judge(OpenAICompatibleLLM(settings.model_copy(update={"llm": llm_cfg})))
    if e.judge_model:
        llm_cfg = settings.llm.model_copy(update={"adapter": None})
        return Judge(LocalLLM(e.judge_model, settings.model_copy(update={"llm": llm_cfg})))
    return None
