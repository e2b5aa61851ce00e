"""The packaged LLM itself (`kb models install` puts it in models/): one quick question that CI runs."""

from __future__ import annotations

import pytest

from kb.models import is_installed
from serve.chain import grounded_prompt
from serve.llm import LocalLLM

SPEC = "model:qwen2.5-0.5b-instruct"
CONTEXT = ("员工入职满一年后，每年享有15天带薪年假；入职不满一年的，按实际在职月数折算。"
           "年假需至少提前两周在OA系统提交申请。")


def test_packaged_llm_answers_a_chinese_question_from_the_context(settings):
    if not is_installed(SPEC):
        pytest.skip(f"{SPEC} is not installed (run `kb models install qwen2.5-0.5b-instruct`)")
    settings.models.llm = SPEC
    settings.llm.adapter = "model:answer-lora"  # the shipped default; skipped with a warning when not installed
    settings.llm.generation.temperature = 0.0
    settings.llm.generation.max_new_tokens = 24
    llm = LocalLLM(SPEC, settings)
    question = "员工每年有几天带薪年假？"
    messages = grounded_prompt(question, [("员工手册.md", CONTEXT)], settings.answer.refusal_zh)
    reply = llm.generate(messages)
    assert reply.strip()
    assert "".join(llm.stream(messages)).strip() == reply  # the stream is the same greedy reply
    ids = llm.inputs(messages)["input_ids"]
    assert llm._cached_prefix(messages, ids) is not None  # the system prompt's cache fits its chat template
    if llm.adapter is None:  # the base model alone: the answer or the refusal sentence, nothing else
        assert "15" in reply or reply.startswith(settings.answer.refusal_zh), reply
    else:  # with the project's adapter (the default install): the answer, with its citation
        assert "15" in reply and "[1]" in reply, reply
