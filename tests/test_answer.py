"""The answer chain on a real KB (FAISS, SQLite, packaged embedder): citations, refusal, compliance."""

from __future__ import annotations

import json

import pytest

from cli import main as kb_main
from retrieval.knowledge_base import KnowledgeBase
from serve.chain import Answer, AnswerChain, public
from serve.compliance import SIMILARITY_KIND


class ScriptedLLM:
    """An LLM that returns a fixed reply: lets a test decide what the model 'said'."""

    name = "scripted"

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.seen: list[list[dict]] = []

    def generate(self, messages):
        self.seen.append(messages)
        return self.reply

    def stream(self, messages):
        yield self.generate(messages)


def test_answerable_question_is_answered_with_a_citation_to_its_source(settings, kb, library):
    chain = AnswerChain(settings, kb, llm=None, library=library)
    r = chain.ask("How long does a refund take to reach my card?")
    assert not r.fallback and r.reason is None
    assert "five working days" in r.answer
    n = int(r.answer.rsplit("[", 1)[1].rstrip("]"))  # the cited passage number
    assert r.sources[n - 1]["source"] == "refunds.md"
    assert r.mode == "extractive"


def test_chinese_question_gets_a_chinese_answer(settings, kb, library):
    r = AnswerChain(settings, kb, llm=None, library=library).ask("员工每年有几天带薪年假？")
    assert not r.fallback
    assert "十五天" in r.answer and r.sources[0]["source"] == "zh.txt"


def test_unanswerable_question_falls_back_with_reason(settings, kb, library):
    r = AnswerChain(settings, kb, llm=None, library=library).ask("Who won the football world cup in 1998?")
    assert r.fallback
    assert "weak retrieval" in r.reason
    assert r.answer == library.pick("fallback", None, "en")


def test_fallback_fits_the_dialogue_stage_and_language(settings, kb, library):
    chain = AnswerChain(settings, kb, llm=None, library=library)
    after = chain.ask("Who won the football world cup in 1998?", stage="after_sale")
    assert after.fallback and after.answer == library.pick("fallback", "after_sale", "en")
    assert after.answer != library.pick("fallback", None, "en")
    zh = chain.ask("明天北京的天气怎么样？", stage="pre_sale")
    assert zh.fallback and zh.answer == library.pick("fallback", "pre_sale", "zh")
    unknown = chain.ask("Who won the football world cup in 1998?", stage="no-such-stage")
    assert unknown.answer == library.pick("fallback", None, "en")  # the universal one


def test_sensitive_word_trips_the_fallback(settings, kb, library):
    settings.compliance.sensitive_words = ["lawsuit"]
    r = AnswerChain(settings, kb, llm=None, library=library).ask("Can I file a lawsuit to get my refund?")
    assert r.fallback and "sensitive" in r.reason
    assert r.answer == library.pick("sensitive", None, "en")


def test_grounded_llm_answer_passes_and_prompt_holds_numbered_context(settings, kb, library):
    llm = ScriptedLLM("Refunds are paid to the original card within five working days [1].")
    r = AnswerChain(settings, kb, llm=llm, library=library).ask("How long does a refund take?")
    assert not r.fallback, r.reason
    system, user = llm.seen[-1]
    assert system["role"] == "system" and settings.answer.refusal_en in system["content"]
    assert "[1] (refunds.md)" in user["content"] and "Question: How long does a refund take?" in user["content"]
    # the approved reply nearest to the answer (not to the question), found here by brute force
    sims = kb.embedder.encode([r.answer], SIMILARITY_KIND) @ kb.embedder.encode(
        [x.text for x in library.replies], SIMILARITY_KIND).T
    best = library.replies[int(sims[0].argmax())]
    want = {"text": best.text, "intent": best.intent, "score": pytest.approx(float(sims[0].max()), abs=1e-3)}
    assert r.approved_match == want


def test_ungrounded_llm_answer_falls_back(settings, kb, library):
    llm = ScriptedLLM("Our CEO enjoys sailing around Tasmania every winter with penguins.")
    r = AnswerChain(settings, kb, llm=llm, library=library).ask("How long does a refund take?")
    assert r.fallback and r.reason.startswith("ungrounded answer")
    assert r.draft == llm.reply and r.answer != llm.reply
    assert llm.reply not in json.dumps(r.to_json())  # the withheld draft stays on the server


def test_model_refusal_becomes_the_fallback_reply(settings, kb, library):
    llm = ScriptedLLM(settings.answer.refusal_en)
    r = AnswerChain(settings, kb, llm=llm, library=library).ask("How long does a refund take?")
    assert r.fallback and "does not contain the answer" in r.reason


def test_require_approved_checks_similarity_to_the_library(settings, kb, library):
    settings.compliance.require_approved = True
    settings.compliance.approved_min = 0.99
    llm = ScriptedLLM("Refunds are paid to the original card within five working days [1].")
    r = AnswerChain(settings, kb, llm=llm, library=library).ask("How long does a refund take?")
    assert r.fallback and "approved reply" in r.reason


def test_follow_up_is_condensed_with_history(settings, kb, library):
    chain = AnswerChain(settings, kb, llm=None, library=library)
    r = chain.ask("and how much does it cost?", history=[["How fast is express delivery?", "One day."]])
    assert r.standalone_question.startswith("How fast is express delivery?")
    assert r.sources[0]["source"] == "shipping.md"
    settings.answer.condense_history = False
    r2 = chain.ask("and how much does it cost?", history=[["How fast is express delivery?", "One day."]])
    assert r2.standalone_question == "and how much does it cost?"


def test_stream_yields_the_checked_answer_then_the_result(settings, kb, library):
    chain = AnswerChain(settings, kb, llm=None, library=library)
    parts = list(chain.stream("How long does a refund take to reach my card?", piece=7))
    result = parts[-1]
    assert isinstance(result, dict) and "".join(parts[:-1]) == result["answer"]
    assert len(parts) > 2


def test_kb_ask_cli_on_sample_documents(settings, tmp_path, capsys, monkeypatch):
    """`kb ask` on a KB built from the bundled samples: cited answer, weak-retrieval and sensitive fallbacks."""
    from tests.conftest import SAMPLES

    kb_ = KnowledgeBase(settings, "samples", create=True)
    kb_.add_paths([SAMPLES / "fake-memo.pdf", SAMPLES / "norwich-city.txt", SAMPLES / "simple.docx"], progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: {{nsp: {settings.models.nsp}, device: cpu, llm: null}}\n"
                   "compliance: {sensitive_words: [weapon]}\n", encoding="utf-8")

    def ask(q: str) -> dict:
        assert kb_main(["ask", q, "--kb", "samples", "--json", "--config", str(cfg)]) == 0
        return json.loads(capsys.readouterr().out)

    good = ask("How many bottles of water were delivered?")
    assert not good["fallback"] and "20,000 bottles" in good["answer"]
    assert good["sources"][0]["source"] == "fake-memo.pdf" and "[1]" in good["answer"]
    none = ask("What is the boiling point of liquid nitrogen?")
    assert none["fallback"] and "weak retrieval" in none["reason"]
    bad = ask("Were weapons delivered with the bottles of water?")
    assert bad["fallback"] and "sensitive" in bad["reason"]
    assert kb_main(["ask", "  ", "--kb", "samples", "--config", str(cfg)]) == 2


@pytest.mark.parametrize("raw", [
    {"answer": "Five days [1].", "sources": [{"source": "refunds.md", "text": "t"}], "fallback": False,
     "reason": None, "standalone_question": "q", "confidence": 0.8, "approved_match": None, "mode": "scripted",
     "internal": {"draft": "Five days [1]."}, "seconds": 0.1},
    {"answer": "A", "sources": [], "fallback": False, "reason": None, "approved_match": {"text": "A"},
     "standalone_question": "q", "confidence": 0.9, "mode": "faq", "faq": {"id": "f", "question": "q", "score": 0.9},
     "internal": {"draft": "A"}, "seconds": 0.1},
    {"answer": "Sorry.", "sources": [], "fallback": True, "reason": "sensitive", "approved_match": None,
     "standalone_question": "q", "confidence": 0.9, "mode": "faq", "faq": {"id": "f", "score": 0.9, "withheld": True},
     "internal": {"draft": "SECRET DRAFT"}, "seconds": 0.1},
])
def test_the_answer_json_is_the_public_result_and_never_holds_the_draft(raw):
    """Answer.to_json() is what public() makes of the chain's result, on the grounded, FAQ and
    withheld paths: the same keys and values, never the draft."""
    a = Answer.from_result(raw)
    assert a.to_json() == public(raw) and a.draft == raw["internal"]["draft"]
    assert "internal" not in a.to_json() and "draft" not in a.to_json() and "SECRET" not in repr(a)
