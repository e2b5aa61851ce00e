"""FAQ entries answered directly (serve/faq.py): import, matching, stages, compliance, CLI."""

from __future__ import annotations

import json

import pytest

from cli import main as kb_main
from kb.settings import apply_overrides
from retrieval.knowledge_base import KnowledgeBase
from serve.chain import AnswerChain
from serve.faq import faq_id, import_faq, list_faq, remove_faq

REFUND_Q = "How long does a refund take?"
REFUND_A = "A refund reaches your card within five working days of the return."
DISCOUNT_Q = "Is there a discount for new customers?"
DISCOUNT_A = "New customers get 10% off their first order."


class NoLLM:
    """An LLM that fails the test when it is called: FAQ answers must not generate."""

    name = "forbidden"

    def generate(self, messages):
        raise AssertionError("the LLM was called for an FAQ answer")

    def stream(self, messages):
        raise AssertionError("the LLM was called for an FAQ answer")


class ScriptedLLM:
    name = "scripted"

    def __init__(self, reply: str) -> None:
        self.reply, self.calls = reply, 0

    def generate(self, messages):
        self.calls += 1
        return self.reply

    def stream(self, messages):
        yield self.generate(messages)


def write_csv(path, rows: list[str]) -> str:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture()
def faq_kb(settings, tmp_path):
    """A KB of two FAQ entries and no documents: one for every stage, one for `pre_sale` only."""
    kb = KnowledgeBase(settings, "faqonly", create=True)
    import_faq(kb, write_csv(tmp_path / "faq.csv", ["question,answer,stage", f"{REFUND_Q},{REFUND_A},",
                                                    f"{DISCOUNT_Q},{DISCOUNT_A},pre_sale"]))
    return kb


@pytest.fixture()
def replies(settings, faq_kb):
    from serve.compliance import ReplyLibrary

    return ReplyLibrary.load(settings.compliance.approved_replies, faq_kb.embedder)


def chain_of(settings, kb, llm, library, **overrides):
    s = apply_overrides(settings, {"faq.threshold": 0.8, **overrides})
    return AnswerChain(s, kb, llm=llm, library=library)


def test_import_csv_xlsx_jsonl_reports_bad_rows_and_is_idempotent(settings, tmp_path):
    import openpyxl

    kb = KnowledgeBase(settings, "faqs", create=True)
    csv_path = write_csv(tmp_path / "zh.csv", ["问题,答案,阶段", "如何退货？,30天内可以退货。,", "运费多少？,,pre_sale",
                                               '"多行的问题？","第一行', '第二行",after_sale'])
    r = import_faq(kb, csv_path)
    assert r["failed"] == [{"line": 3, "error": "empty answer"}]
    assert (r["rows"], r["imported"], r["added"]) == (3, 2, 2)

    wb = openpyxl.Workbook()
    ws = wb.active
    for row in (["Question", "Answer"], [REFUND_Q, REFUND_A], [None, "an answer without a question"],
                [DISCOUNT_Q, DISCOUNT_A]):
        ws.append(row)
    wb.save(tmp_path / "en.xlsx")
    r = import_faq(kb, tmp_path / "en.xlsx")
    assert r["failed"] == [{"line": 3, "error": "empty question"}] and r["added"] == 2

    (tmp_path / "more.jsonl").write_text(
        json.dumps({"question": "Do you ship abroad?", "answer": "Yes, to the EU."}) + "\n{not json\n"
        + json.dumps({"问题": "营业时间？", "答案": "9点到18点。", "阶段": "pre_sale"}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    r = import_faq(kb, tmp_path / "more.jsonl")
    assert [f["line"] for f in r["failed"]] == [2] and r["added"] == 2 and r["entries"] == 6

    entries = {e.faq_id: e for e in list_faq(kb)}
    assert entries[faq_id("多行的问题？", "after_sale")].answer == "第一行\n第二行"
    assert entries[faq_id("营业时间？", "pre_sale")].stage == "pre_sale"
    again = import_faq(kb, tmp_path / "en.xlsx")  # the same file again: nothing changes, ids stay
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 2)
    assert {e.faq_id: e for e in list_faq(kb)}.keys() == entries.keys()
    assert remove_faq(kb, [faq_id(REFUND_Q)]) == 1 and len(list_faq(kb)) == 5


def test_matching_question_gets_the_faq_answer_and_citation_without_the_llm(settings, faq_kb, replies):
    chain = chain_of(settings, faq_kb, NoLLM(), replies)
    r = chain.ask("how long does a refund take").to_json()
    fid = faq_id(REFUND_Q)
    assert r["answer"] == REFUND_A and not r["fallback"] and r["mode"] == "faq"
    assert r["sources"][0]["source"] == f"FAQ #{fid}: {REFUND_Q}" and r["sources"][0]["text"] == REFUND_A
    assert r["faq"]["id"] == fid and r["faq"]["score"] >= 0.8
    parts = list(chain.stream("how long does a refund take", piece=9))  # the streaming path too
    assert "".join(parts[:-1]) == REFUND_A and parts[-1]["faq"]["id"] == fid and not parts[-1]["replace"]


def test_question_below_the_threshold_goes_to_the_normal_chain(settings, kb, library, tmp_path):
    import_faq(kb, write_csv(tmp_path / "faq.csv", ["question,answer", f"{REFUND_Q},{REFUND_A}"]))
    llm = ScriptedLLM("Express delivery takes one day and costs 9 euros [1].")
    r = chain_of(settings, kb, llm, library).ask("How much does express delivery cost?")
    assert llm.calls == 1 and r.mode == "scripted" and r.faq is None and "faq" not in r.to_json()
    assert r.sources[0]["source"] == "shipping.md"


def test_an_entry_with_a_stage_matches_only_that_stage(settings, faq_kb, replies):
    chain = chain_of(settings, faq_kb, NoLLM(), replies)
    assert chain.ask(DISCOUNT_Q, stage="pre_sale").answer == DISCOUNT_A
    for stage in (None, "after_sale"):
        assert chain.ask(DISCOUNT_Q, stage=stage).mode != "faq"
    assert chain.ask(REFUND_Q, stage="after_sale").answer == REFUND_A  # no stage: every stage


def test_sensitive_word_in_an_faq_answer_is_withheld_everywhere(settings, faq_kb, replies, tmp_path):
    secret = "Call the hotline about the embargo list."
    import_faq(faq_kb, write_csv(tmp_path / "s.csv", ["question,answer", f"Which countries can you ship to?,{secret}"]))
    chain = chain_of(settings, faq_kb, NoLLM(), replies, **{"compliance.sensitive_words": ["embargo"]})
    r = chain.ask("Which countries can you ship to?").to_json()
    assert r["fallback"] and "sensitive" in r["reason"]
    assert r["answer"] == replies.pick("sensitive", None, "en")
    streamed = list(chain.stream("Which countries can you ship to?"))
    for text in (json.dumps(r), json.dumps(streamed)):
        assert "embargo" not in text and "hotline" not in text


def test_faq_answers_join_the_approved_reply_library(settings, kb, library, tmp_path):
    reply = "Refunds are paid to the original card within five working days [1]."
    s = apply_overrides(settings, {"compliance.require_approved": True, "compliance.approved_min": 0.99,
                                   "faq.threshold": 0.99})
    assert AnswerChain(s, kb, llm=ScriptedLLM(reply), library=library).ask(REFUND_Q).fallback
    import_faq(kb, write_csv(tmp_path / "a.csv", ["question,answer", f"Where is my refund paid to?,{reply}"]))
    r = AnswerChain(s, kb, llm=ScriptedLLM(reply), library=library).ask(REFUND_Q)
    assert r.mode == "scripted" and not r.fallback and r.approved_match["intent"] == "faq"


def test_a_stage_bound_faq_answer_is_approved_only_in_its_stage_and_a_question_has_one_per_stage(
        settings, kb, library, tmp_path):
    reply = "Refunds are paid to the original card within five working days [1]."
    rows = ["question,answer,stage", f"Where is my refund paid to?,{reply},after_sale",
            "Where is my refund paid to?,Refunds go to the card you paid with.,pre_sale"]
    report = import_faq(kb, write_csv(tmp_path / "st.csv", rows))
    assert report["added"] == 2 and not report["duplicates"]
    s = apply_overrides(settings, {"compliance.require_approved": True, "compliance.approved_min": 0.99,
                                   "faq.threshold": 0.99})
    chain = AnswerChain(s, kb, llm=ScriptedLLM(reply), library=library)
    assert not chain.ask(REFUND_Q, stage="after_sale").fallback
    other = chain.ask(REFUND_Q, stage="pre_sale")
    assert other.fallback and (other.approved_match or {}).get("text") != reply


def test_an_faq_answer_with_a_sensitive_word_is_no_approved_reply_so_never_an_approved_match(
        settings, kb, library, tmp_path):
    secret = "Refunds are paid to the original card within five working days, embargo list aside."
    reply = "Refunds are paid to the original card within five working days [1]."
    import_faq(kb, write_csv(tmp_path / "s.csv", ["question,answer", f"Where is my refund paid to?,\"{secret}\""]))
    s = apply_overrides(settings, {"compliance.sensitive_words": ["embargo"], "faq.threshold": 0.99})
    chain = AnswerChain(s, kb, llm=ScriptedLLM(reply), library=library)
    r = chain.ask(REFUND_Q).to_json()
    assert r["mode"] == "scripted" and not r["fallback"] and r["approved_match"] is not None
    assert "embargo" not in json.dumps(r) and "embargo" not in json.dumps(list(chain.stream(REFUND_Q)))
    assert all("embargo" not in x.text for x in chain.compliance.library.replies)


def test_configured_faq_settings_reach_the_matcher(settings, faq_kb, replies, tiny_reranker_dir):
    chain = chain_of(settings, faq_kb, NoLLM(), replies, **{"faq.threshold": 0.42, "faq.candidates": 1})
    chain.refresh_faq()
    assert chain.faq.matcher.threshold == 0.42 and chain.faq.matcher.reranker is None
    assert len(chain.faq.matcher.scored("refund")) == 1
    strict = chain_of(settings, faq_kb, None, replies, **{"faq.threshold": 1.01})
    assert strict.ask(REFUND_Q).mode != "faq"  # even the exact question stays below
    rr = chain_of(settings, faq_kb, None, replies, **{"models.reranker": str(tiny_reranker_dir),
                                                      "faq.rerank_threshold": 0.3, "faq.use_reranker": True})
    rr.refresh_faq()
    assert rr.faq.matcher.reranker is not None and rr.faq.matcher.threshold == 0.3
    top = rr.faq.matcher.scored(REFUND_Q)
    assert top[0].rerank_score is not None and top[0].score == top[0].rerank_score
    no_rr = chain_of(settings, faq_kb, None, replies, **{"models.reranker": str(tiny_reranker_dir)})
    no_rr.refresh_faq()
    assert no_rr.faq.matcher.reranker is None  # faq.use_reranker is off by default
    off = chain_of(settings, faq_kb, None, replies, **{"faq.enabled": False})
    assert off.faq is None and off.ask(REFUND_Q).mode != "faq"


def test_kb_faq_cli_end_to_end(settings, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KB_LLM__BACKEND", "extractive")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: {{nsp: {settings.models.nsp}, device: cpu, llm: null}}\nfaq: {{threshold: 0.8}}\n",
                   encoding="utf-8")

    def run(*argv: str) -> tuple[int, dict | None]:
        code = kb_main([*argv, "--json", "--config", str(cfg)])
        out = capsys.readouterr().out
        return code, json.loads(out) if out.strip() else None

    path = write_csv(tmp_path / "f.csv", ["问题,答案", f"{REFUND_Q},{REFUND_A}", f"{DISCOUNT_Q},", "x,y"])
    code, out = run("faq", "import", path, "--kb", "cli")
    assert code == 0 and out["imported"] == 2 and out["failed"] == [{"line": 3, "error": "empty answer"}]
    code, out = run("faq", "list", "--kb", "cli")
    assert {e["question"] for e in out["faq"]} == {REFUND_Q, "x"}
    code, out = run("ask", "how long does a refund take?", "--kb", "cli")
    assert code == 0 and out["answer"] == REFUND_A and out["sources"][0]["source"].startswith("FAQ #")
    assert run("faq", "rm", "--kb", "cli", "--id", "nope")[0] == 2
    code, out = run("faq", "rm", "--kb", "cli", "--id", faq_id("x"))
    assert code == 0 and out["removed"]["count"] == 1
    assert run("faq", "rm", "--kb", "cli", "--all")[1]["removed"]["count"] == 1
    assert run("faq", "list", "--kb", "cli")[1]["faq"] == []
    (tmp_path / "bad.txt").write_text("question,answer\n", encoding="utf-8")
    assert run("faq", "import", str(tmp_path / "bad.txt"), "--kb", "cli")[0] == 2
    assert run("faq", "import", write_csv(tmp_path / "h.csv", ["foo,bar", "a,b"]), "--kb", "cli")[0] == 2


def test_http_ask_and_chat_completions_answer_from_the_faq(settings, faq_kb):
    import httpx

    from serve.api import create_app
    from serve.auth import KeyRing
    from serve.service import Service
    from tests.conftest import serving

    s = apply_overrides(settings, {"faq.threshold": 0.8})
    with serving(create_app(s, Service(s, llm=NoLLM()), keys=KeyRing({"k": ["faqonly"]}))) as base:
        c = httpx.Client(base_url=base, timeout=60, headers={"Authorization": "Bearer k"})
        r = c.post("/v1/ask", json={"kb": "faqonly", "question": "how long does a refund take"}).json()
        assert r["answer"] == REFUND_A and r["faq"]["id"] == faq_id(REFUND_Q)
        body = {"model": "faqonly", "messages": [{"role": "user", "content": "how long does a refund take"}]}
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["message"]["content"] == REFUND_A and r["kb"]["faq"]["id"] == faq_id(REFUND_Q)
        events = c.post("/v1/chat/completions", json={**body, "stream": True}).text
        deltas = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
        assert "".join(d["choices"][0]["delta"].get("content", "") for d in deltas) == REFUND_A


def test_the_faq_benchmark_records_the_thresholds_it_chose_not_the_configured_ones(settings):
    from bench.faq import SWEPT, chosen_config

    assert chosen_config([{"threshold": 0.97}, {"threshold": None}]) == {"faq.threshold": 0.97,
                                                                          "faq.rerank_threshold": None}
    assert chosen_config([{"threshold": 0.9}]) == {"faq.threshold": 0.9}
    assert settings.faq.model_dump().keys() >= SWEPT and not SWEPT & settings.faq.model_dump(exclude=SWEPT).keys()
