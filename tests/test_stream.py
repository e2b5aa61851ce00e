"""Streaming with compliance: the sensitive-word guard, live and checked modes of the chain, SSE
on a real uvicorn server (/v1/ask and the OpenAI-compatible route), `kb ask --stream`."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from serve.api import create_app
from serve.auth import KeyRing
from serve.chain import AnswerChain
from serve.compliance import StreamGuard
from serve.service import Service
from tests.conftest import serving

GROUNDED = ["Refunds are paid ", "to the original card ", "within five working days [1]."]
UNGROUNDED = ["Our CEO enjoys ", "sailing around Tasmania ", "every winter with penguins."]
SPLIT_WORD = ["Refunds are paid to the original card within five working days [1]. You could file a law",
              "suit", " if not."]


class PiecesLLM:
    """An LLM that streams fixed pieces and records what happened."""

    name = "pieces"

    def __init__(self, parts: list[str]) -> None:
        self.parts = parts
        self.calls = 0
        self.done = False
        self.closed_early = False

    def generate(self, messages) -> str:
        self.calls += 1
        self.done = True
        return "".join(self.parts)

    def stream(self, messages):
        self.calls += 1
        try:
            yield from self.parts
            self.done = True
        except GeneratorExit:
            self.closed_early = True
            raise


def _run(chain, question="How long does a refund take?", **kw):
    events = list(chain.stream(question, **kw))
    assert isinstance(events[-1], dict) and all(isinstance(e, str) for e in events[:-1])
    return [e for e in events[:-1] if e], events[-1]


# the guard ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("word", ["lawsuit", "起诉"])
def test_guard_never_releases_any_part_of_a_word_split_across_pieces(word):
    text = f"You may {word} us." if word.isascii() else f"您可以{word}我们。"
    start = text.index(word)
    for cut in range(1, len(text)):
        for cut2 in range(cut, len(text) + 1):
            g = StreamGuard([word, "x"])
            out = "".join(g.feed(p) for p in (text[:cut], text[cut:cut2], text[cut2:]))
            assert g.hit == word and text.startswith(out) and len(out) <= start
            assert g.rest() == ""


def test_guard_releases_everything_at_the_end_without_edge_whitespace():
    g = StreamGuard(["lawsuit"])
    out = "".join(g.feed(p) for p in ["  Refunds take", " five days", " [1]. \n"])
    assert len(out) < len("Refunds take five days [1].")  # the tail is held back
    assert out + g.rest() == "Refunds take five days [1]."
    g = StreamGuard([])
    assert "".join(g.feed(p) for p in ["a ", "b"]) == "a b"


# the chain ---------------------------------------------------------------------------------------
def test_live_stream_sends_pieces_before_generation_ends(settings, kb, library):
    llm = PiecesLLM(GROUNDED)
    chain = AnswerChain(settings, kb, llm=llm, library=library)
    stream = chain.stream("How long does a refund take?", mode="live")
    first = next(stream)
    assert first == "Refunds are paid" and not llm.done  # a real stream: the model is still going
    rest = list(stream)
    final = rest[-1]
    assert not final["fallback"] and not final["replace"]
    assert first + "".join(rest[:-1]) == final["answer"] == "".join(GROUNDED)
    assert "internal" not in final and "draft" not in final


def test_sensitive_word_split_across_two_pieces_never_reaches_the_client(settings, kb, library):
    settings.compliance.sensitive_words = ["lawsuit"]
    llm = PiecesLLM(SPLIT_WORD)
    sent, final = _run(AnswerChain(settings, kb, llm=llm, library=library), mode="live")
    text = "".join(sent)
    assert "law" not in text and text and SPLIT_WORD[0].startswith(text)
    assert llm.closed_early  # generation stopped at the word
    assert final["fallback"] and final["replace"] and "sensitive" in final["reason"]
    assert final["answer"] == library.pick("sensitive", None, "en")
    dumped = json.dumps(final)
    assert "lawsuit" not in dumped and "You could file" not in dumped


def test_stream_failing_grounding_ends_with_a_final_event_that_replaces_it(settings, kb, library):
    sent, final = _run(AnswerChain(settings, kb, llm=PiecesLLM(UNGROUNDED), library=library), mode="live")
    assert "".join(sent).startswith("Our CEO enjoys")  # live: the draft was partly seen
    assert final["fallback"] and final["replace"] and final["reason"].startswith("ungrounded answer")
    assert final["answer"] == library.pick("fallback", None, "en")
    dumped = json.dumps(final)
    for p in UNGROUNDED:
        assert p.strip() not in dumped  # the withheld text is in no field of the final event


def test_a_model_refusal_is_not_streamed_but_becomes_the_fallback(settings, kb, library):
    refusal = settings.answer.refusal_en
    llm = PiecesLLM([refusal[:20], refusal[20:]])
    sent, final = _run(AnswerChain(settings, kb, llm=llm, library=library), mode="live")
    assert final["fallback"] and "does not contain the answer" in final["reason"] and not final["replace"]
    assert "".join(sent) == final["answer"] == library.pick("fallback", None, "en")
    g = StreamGuard([], [refusal])
    assert g.feed(refusal[:10]) == "" and g.feed(" but refunds take five days") != ""  # diverged: released


def _noting(fn: Callable, calls: list) -> Callable:
    """`fn`, appending 1 to `calls` at each call."""

    def wrapper(*a, **kw):
        calls.append(1)
        return fn(*a, **kw)

    return wrapper


def test_checked_mode_sends_nothing_before_the_check(settings, kb, library):
    for mode, parts, before in (("checked", UNGROUNDED, True), ("checked", GROUNDED, True), ("live", GROUNDED, False)):
        chain = AnswerChain(settings, kb, llm=PiecesLLM(parts), library=library)
        checked, check = [], chain.compliance.check
        chain.compliance.check = _noting(check, checked)
        stream = chain.stream("How long does a refund take?", mode=mode)
        first = next(stream)
        assert bool(checked) is before, mode  # checked: compliance ran before the first piece
        final = list(stream)[-1] if not isinstance(first, dict) else first
        assert not final["replace"]
        if parts is UNGROUNDED:
            assert first == final["answer"][: len(first)] and "CEO" not in first


def test_weak_retrieval_and_sensitive_questions_are_decided_before_generation(settings, kb, library):
    settings.compliance.sensitive_words = ["lawsuit"]
    for q, reason in (("Who won the football world cup in 1998?", "weak retrieval"),
                      ("Can I file a lawsuit to get my refund?", "sensitive")):
        llm = PiecesLLM(GROUNDED)
        chain = AnswerChain(settings, kb, llm=llm, library=library)
        sent, final = _run(chain, q, mode="live")
        assert llm.calls == 0 and final["fallback"] and reason in final["reason"]
        assert "".join(sent) == final["answer"] and not final["replace"]
        r = chain.ask(q)
        assert llm.calls == 0 and r.fallback and reason in r.reason


def test_setting_picks_the_stream_mode(settings, kb, library):
    settings.answer.stream_mode = "checked"
    chain = AnswerChain(settings, kb, llm=PiecesLLM(UNGROUNDED), library=library)
    sent, final = _run(chain)
    assert not final["replace"] and "".join(sent) == final["answer"]
    settings.answer.stream_mode = "live"
    sent, final = _run(chain)
    assert final["replace"]


# over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture()
def server(settings, kb):
    llm = PiecesLLM(GROUNDED)
    app = create_app(settings, service=Service(settings, llm=llm), keys=KeyRing({"reader": ["policies"]}))
    with serving(app) as base:
        yield base, llm


def _sse(base: str, path: str, body: dict) -> list:
    with (httpx.Client(base_url=base, timeout=60, headers={"Authorization": "Bearer reader"}) as c,
          c.stream("POST", path, json=body) as r):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_ask_sse_streams_deltas_then_a_final_event(server):
    base, llm = server
    evs = _sse(base, "/v1/ask", {"kb": "policies", "question": "How long does a refund take?", "stream": True})
    deltas, final = evs[:-1], evs[-1]
    assert [e["type"] for e in deltas] == ["delta"] * len(deltas) and len(deltas) >= 2
    assert final["type"] == "final" and not final["replace"] and not final["fallback"]
    assert "".join(e["text"] for e in deltas) == final["answer"] == "".join(GROUNDED)
    assert final["sources"] and "internal" not in final


def test_ask_sse_with_a_split_sensitive_word_and_no_draft_anywhere(server, settings):
    base, llm = server
    settings.answer.stream_mode = "live"  # the opt-in mode, where the held-back window matters
    settings.compliance.sensitive_words = ["lawsuit"]
    llm.parts = SPLIT_WORD
    evs = _sse(base, "/v1/ask", {"kb": "policies", "question": "How long does a refund take?", "stream": True})
    assert "law" not in "".join(e["text"] for e in evs[:-1])
    assert evs[-1]["replace"] and evs[-1]["fallback"] and "lawsuit" not in json.dumps(evs[-1])
    llm.parts = UNGROUNDED
    with httpx.Client(base_url=base, timeout=60, headers={"Authorization": "Bearer reader"}) as c:
        r = c.post("/v1/ask", json={"kb": "policies", "question": "How long does a refund take?"})
    body = r.json()
    assert body["fallback"] and "draft" not in body and "internal" not in body
    assert all(p.strip() not in r.text for p in UNGROUNDED)  # the withheld reply is in no field


def test_openai_stream_live_and_checked(server, settings):
    base, llm = server
    settings.answer.stream_mode = "live"
    llm.parts = UNGROUNDED
    body = {"model": "policies", "stream": True,
            "messages": [{"role": "user", "content": "How long does a refund take?"}]}
    evs = _sse(base, "/v1/chat/completions", body)
    assert evs[-1] == "[DONE]"
    last = evs[-2]
    assert last["choices"][0]["finish_reason"] == "content_filter" and last["kb"]["replace"]
    fallback = last["kb"]["answer"]
    assert last["choices"][0]["delta"]["content"].strip() == fallback
    assert all(p.strip() not in json.dumps(last) for p in UNGROUNDED)
    settings.answer.stream_mode = "checked"
    evs = _sse(base, "/v1/chat/completions", body)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs[:-1])
    assert text == fallback and evs[-2]["choices"][0]["finish_reason"] == "stop"


def test_kb_ask_stream_prints_pieces_and_json_stays_one_document(settings, kb, capsys, tmp_path, monkeypatch):
    from cli import main as kb_main
    from serve import chain as chain_mod

    monkeypatch.setattr(chain_mod, "build_llm", lambda s: PiecesLLM(GROUNDED))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: {{nsp: {settings.models.nsp}, device: cpu}}\n", encoding="utf-8")
    assert kb_main(["ask", "How long does a refund take?", "--kb", "policies", "--stream", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("".join(GROUNDED)) and "[1] refunds.md" in out
    assert kb_main(["ask", "How long does a refund take?", "--kb", "policies", "--stream", "--json",
                    "--config", str(cfg)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["answer"] == "".join(GROUNDED) and "internal" not in doc


def test_a_live_stream_citing_a_passage_the_prompt_did_not_have_is_replaced(settings, kb, library):
    llm = PiecesLLM(["Refunds are paid to the original card ", "within five working days [1] [7]."])
    sent, final = _run(AnswerChain(settings, kb, llm=llm, library=library), mode="live")
    assert "[7]" in "".join(sent)  # live: the model's text went out as it came
    assert final["replace"] and not final["fallback"]
    assert final["answer"] == "Refunds are paid to the original card within five working days [1]."
