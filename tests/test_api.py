"""The HTTP API on a real uvicorn server on localhost, called over HTTP (httpx, the openai client)."""

from __future__ import annotations

import httpx
import pytest

from retrieval.knowledge_base import KnowledgeBase
from serve.api import create_app
from serve.auth import KeyRing
from tests.conftest import DOCS, serving, write_files

KEYS = {"reader": ["policies"], "other": ["elsewhere"], "writer": ["policies:rw", "fresh:rw"], "admin": ["*:rw"]}


@pytest.fixture()
def server(settings, tmp_path):
    settings.serve.max_upload_mb = 0.05  # 51 KiB: small enough to test the limit cheaply
    KnowledgeBase(settings, "policies", create=True).add_items(write_files(tmp_path / "d", DOCS), progress=False)
    with serving(create_app(settings, keys=KeyRing(KEYS))) as base:
        yield base


def client(base: str, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {})


def test_auth_401_and_403(server):
    assert client(server).get("/healthz").json()["status"] == "ok"
    r = client(server).get("/v1/kbs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert client(server, "wrong").post("/v1/ask", json={"kb": "policies", "question": "x"}).status_code == 401
    r = client(server, "other").post("/v1/ask", json={"kb": "policies", "question": "refund time?"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert [k["name"] for k in client(server, "reader").get("/v1/kbs").json()["kbs"]] == ["policies"]
    assert client(server, "other").get("/v1/kbs").json()["kbs"] == []
    r = client(server, "reader").delete("/v1/kbs/policies/documents/abc")
    assert r.status_code == 403  # read-only key


def test_malformed_bodies_get_422_json_errors(server):
    c = client(server, "reader")
    r = c.post("/v1/ask", content=b'{"kb": "policies"', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = c.post("/v1/ask", json={"kb": "policies"})
    assert r.status_code == 422 and "question" in r.json()["error"]["message"]
    r = c.post("/v1/ask", json={"kb": "policies", "question": ""})
    assert r.status_code == 422
    r = c.post("/v1/chat/completions", json={"model": "policies", "messages": [{"role": "assistant", "content": "hi"}]})
    assert r.status_code == 422 and "user message" in r.json()["error"]["message"]
    r = c.post("/v1/ask", json={"kb": "../etc", "question": "x"})
    assert r.status_code == 422
    r = client(server, "admin").post("/v1/ask", json={"kb": "nope", "question": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_ask_returns_the_kb_ask_json(server):
    r = client(server, "reader").post("/v1/ask", json={"kb": "policies", "question": "How long does a refund take?"})
    body = r.json()
    assert r.status_code == 200 and set(body) >= {"answer", "sources", "fallback", "reason"}
    assert not body["fallback"] and "five working days" in body["answer"]
    assert body["sources"][0]["source"] == "refunds.md"
    r = client(server, "reader").post("/v1/ask", json={"kb": "policies", "question": "and the express price?",
                                                       "history": [["How fast is express delivery?", "One day."]],
                                                       "stage": "pre_sale"})
    assert r.status_code == 200 and r.json()["sources"][0]["source"] == "shipping.md"


def test_upload_list_and_delete_documents(server, tmp_path):
    w = client(server, "writer")
    files = {"files": ("warranty.md", b"# Warranty\n\nEvery laptop has a warranty of three years, parts and labour.",
                       "text/markdown")}
    r = w.post("/v1/kbs/policies/documents", files=files)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ingested"] == 1 and out["failed"] == []
    doc_id = out["doc_ids"][0]
    docs = client(server, "reader").get("/v1/kbs/policies/documents").json()["documents"]
    assert "warranty.md" in [d["source"] for d in docs] and all("path" not in d for d in docs)
    ans = client(server, "reader").post("/v1/ask",
                                        json={"kb": "policies", "question": "How long is the laptop warranty?"})
    assert "three years" in ans.json()["answer"]
    assert w.delete(f"/v1/kbs/policies/documents/{doc_id}").json() == {"removed": {"kb": "policies", "doc_id": doc_id}}
    assert w.delete(f"/v1/kbs/policies/documents/{doc_id}").status_code == 404
    docs = client(server, "reader").get("/v1/kbs/policies/documents").json()["documents"]
    assert "warranty.md" not in [d["source"] for d in docs]
    # a new KB is created by its first upload (the key may write it)
    r = w.post("/v1/kbs/fresh/documents", files={"file": ("a.txt", b"The office opens at nine o'clock.", "text/plain")})
    assert r.status_code == 200 and r.json()["ingested"] == 1


def test_bad_uploads(server, settings):
    w = client(server, "writer")
    big = b"x" * (200 * 1024)
    r = w.post("/v1/kbs/policies/documents", files={"files": ("big.txt", big, "text/plain")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunked():  # no Content-Length: the limit is enforced while saving
        for _ in range(4):
            head = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.txt\"\r\n\r\n"
            yield head if _ == 0 else b""
            yield b"y" * (40 * 1024)
        yield b"\r\n--b--\r\n"

    r = w.post("/v1/kbs/policies/documents", content=chunked(),
               headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    r = w.post("/v1/kbs/policies/documents", files={"files": ("empty.txt", b"", "text/plain")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unreadable_document"
    assert "empty.txt" in r.json()["error"]["message"] and "empty" in r.json()["error"]["message"]
    assert str(settings.home) not in r.json()["error"]["message"]  # no server paths
    r = w.post("/v1/kbs/policies/documents", json={"files": "nope"})
    assert r.status_code == 422
    docs = client(server, "reader").get("/v1/kbs/policies/documents").json()["documents"]
    assert sorted(d["source"] for d in docs) == sorted(DOCS)  # nothing half-added


def test_openapi_schema_lists_the_routes(server):
    paths = client(server).get("/openapi.json").json()["paths"]
    for p in ("/v1/ask", "/v1/chat/completions", "/v1/kbs", "/v1/kbs/{kb}/documents",
              "/v1/kbs/{kb}/documents/{doc_id}", "/healthz"):
        assert p in paths


def test_openai_client_chat_completions_with_and_without_streaming(server):
    from openai import AuthenticationError, OpenAI, PermissionDeniedError

    oa = OpenAI(base_url=f"{server}/v1", api_key="reader", max_retries=0)
    assert [m.id for m in oa.models.list()] == ["policies"]
    msgs = [{"role": "system", "content": "Be nice."},
            {"role": "user", "content": "How long does a refund take to reach my card?"}]
    full = oa.chat.completions.create(model="policies", messages=msgs)
    text = full.choices[0].message.content
    assert "five working days" in text and full.choices[0].finish_reason == "stop"
    assert full.model_extra["kb"]["sources"][0]["source"] == "refunds.md"
    pieces, finish = [], None
    for ev in oa.chat.completions.create(model="policies", messages=msgs, stream=True):
        if ev.choices and ev.choices[0].delta.content:
            pieces.append(ev.choices[0].delta.content)
        if ev.choices and ev.choices[0].finish_reason:
            finish = ev.choices[0].finish_reason
    assert "".join(pieces) == text and len(pieces) > 1 and finish == "stop"
    with pytest.raises(PermissionDeniedError):
        OpenAI(base_url=f"{server}/v1", api_key="other", max_retries=0).chat.completions.create(model="policies",
                                                                                              messages=msgs)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="bad", max_retries=0).chat.completions.create(model="policies",
                                                                                              messages=msgs)


def test_openai_compatible_backend_talks_to_an_openai_endpoint(server, settings, monkeypatch):
    """The chain's OpenAI-compatible LLM backend, pointed at this server's own endpoint."""
    from serve.llm import OpenAICompatibleLLM

    monkeypatch.setenv("TEST_KEY", "reader")
    settings = settings.model_copy(deep=True)  # the server keeps its own (extractive) settings
    settings.llm.openai_base_url = f"{server}/v1"
    settings.llm.openai_model = "policies"
    settings.llm.openai_api_key_env = "TEST_KEY"
    llm = OpenAICompatibleLLM(settings)
    msgs = [{"role": "user", "content": "How long does a refund take to reach my card?"}]
    text = llm.generate(msgs)
    assert "five working days" in text
    assert "".join(llm.stream(msgs)).strip() == text


def test_no_keys_refuses_to_start(settings, monkeypatch):
    from kb.settings import ConfigError

    monkeypatch.delenv("KB_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="no API keys"):
        create_app(settings)
    monkeypatch.setenv("KB_API_KEYS", '{"k": ["a:rw"]}')
    assert KeyRing.from_settings(settings).grant("k").can_write("a")
    monkeypatch.setenv("KB_API_KEYS", "not json")
    with pytest.raises(ConfigError, match="KB_API_KEYS"):
        KeyRing.from_settings(settings)
