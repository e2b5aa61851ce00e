"""API hardening on a real uvicorn server: the body limit while reading (chunked uploads), error
bodies without internals and with a request id, /healthz without model paths, length limits,
content-hash upload identity, a withheld reply in no response byte, and schemathesis against the
server's own OpenAPI schema."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from bench.api_fuzz import chunked_upload, fuzz
from serve.api import MAX_JSON_BODY, create_app
from serve.auth import KeyRing
from serve.service import Service
from tests.conftest import serving

KEYS = {"reader": ["policies"], "writer": ["policies:rw"], "admin": ["*:rw"]}
UNGROUNDED = ["Our CEO enjoys ", "sailing around Tasmania ", "every winter with penguins."]
SECRET = "sk-secret-token at /srv/models/private-llm"


def client(base: str, key: str | None = None, **headers: str) -> httpx.Client:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base, timeout=60, headers={**auth, **headers})


@pytest.fixture()
def app(settings, kb):
    settings.serve.max_upload_mb = 0.05  # 51 KiB: small enough to test the limit cheaply
    return create_app(settings, keys=KeyRing(KEYS))


@pytest.fixture()
def server(app):
    with serving(app) as base:
        yield base


# 1. the body limit holds while reading ----------------------------------------------------------
def test_chunked_upload_100x_over_the_limit_is_refused_after_reading_a_small_multiple(app, server):
    limit = int(0.05 * 2**20)
    out = chunked_upload(server, "/v1/kbs/policies/documents", "writer", 100 * limit)
    assert out["status"] == 413 and out["body"]["error"]["code"] == "payload_too_large"
    stats = app.state.body_stats
    assert stats.refused == 1 and stats.last_limit <= 3 * limit
    # read: the limit and what uvicorn buffered in one receive (its 64 KiB high-water mark and a 256 KiB socket read)
    assert limit < stats.last_read <= stats.last_limit + (400 << 10) and stats.last_read < 100 * limit / 5
    assert out["sent"] < 100 * limit / 5  # the client was stopped long before it sent it all
    # the same for a JSON route (MAX_JSON_BODY): a chunked body with no Content-Length
    body = b'{"kb": "policies", "question": "' + b"x" * (MAX_JSON_BODY + 1)
    r = client(server, "reader").post("/v1/ask", content=iter([body]), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


# 2. errors: no internals, a request id everywhere --------------------------------------------------
class FailingLLM:
    """An LLM that fails with internals in its message."""

    name = "failing"

    def generate(self, messages) -> str:
        raise RuntimeError(SECRET)

    def stream(self, messages):
        raise RuntimeError(SECRET)
        yield ""  # pragma: no cover - a generator


def test_internal_errors_show_no_internals_and_name_the_request_id(settings, kb, caplog):
    app = create_app(settings, service=Service(settings, llm=FailingLLM()), keys=KeyRing(KEYS))
    q = {"kb": "policies", "question": "How long does a refund take?"}
    with serving(app) as base, caplog.at_level(logging.ERROR):
        c = client(base, "reader", **{"X-Request-ID": "req-42.abc"})
        r = c.post("/v1/ask", json=q)
        evs = c.post("/v1/ask", json={**q, "stream": True}).text
        chat = c.post("/v1/chat/completions", json={"model": "policies", "stream": True,
                                                    "messages": [{"role": "user", "content": q["question"]}]}).text
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-42.abc"
    err = r.json()["error"]
    assert err["code"] == "internal_error" and err["request_id"] == "req-42.abc" and "req-42.abc" in err["message"]
    for text in (r.text, evs, chat):
        assert "sk-secret" not in text and "RuntimeError" not in text and "/srv/models" not in text
    assert '"internal_error"' in evs and "req-42.abc" in evs and '"internal_error"' in chat
    logged = [rec for rec in caplog.records if rec.exc_info and SECRET in str(rec.exc_info[1])]
    assert logged and all(rec.request_id == "req-42.abc" for rec in logged)  # the details are in the log


def test_request_ids_on_every_response_and_error_body(server):
    r = client(server).get("/healthz")
    assert len(r.headers["x-request-id"]) >= 16
    assert client(server).get("/healthz").headers["x-request-id"] != r.headers["x-request-id"]
    r = client(server, **{"X-Request-ID": "abc-1"}).get("/v1/kbs")
    assert r.status_code == 401 and r.headers["x-request-id"] == "abc-1" and r.json()["error"]["request_id"] == "abc-1"
    for bad in ("x" * 200, "a b", "<script>", "a;b"):
        r = client(server, "reader", **{"X-Request-ID": bad}).get("/v1/nope")
        assert r.status_code == 404 and r.headers["x-request-id"] != bad
        assert r.json()["error"] == {"code": "not_found", "message": "Not Found",
                                     "request_id": r.headers["x-request-id"]}
    r = client(server, "reader").request("PATCH", "/v1/ask")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["code"] == "method_not_allowed"


def test_validation_errors_do_not_echo_large_inputs(server):
    r = client(server, "reader").post("/v1/ask", json={"kb": "policies", "question": "Z" * 5000,
                                                       "history": [["Q" * 9000, "A"]] * 3})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert len(r.content) < 4000 and "ZZZZZZZZZZ" not in r.text and "QQQQQQQQQQ" not in r.text


# 3. /healthz ------------------------------------------------------------------------------------
def test_healthz_shows_the_backend_kind_only(settings, kb):
    with serving(create_app(settings, keys=KeyRing(KEYS))) as base:
        assert client(base).get("/healthz").json() == {"status": "ok", "llm": "extractive"}
    settings = settings.model_copy(deep=True)
    settings.llm.openai_base_url = "http://secret-host.internal:9/v1"
    settings.llm.openai_model = "private-model"
    with serving(create_app(settings, keys=KeyRing(KEYS))) as base:
        r = client(base).get("/healthz")
    assert r.json() == {"status": "ok", "llm": "openai"}
    assert "secret-host" not in r.text and "private-model" not in r.text


# 4. length limits ---------------------------------------------------------------------------------
TOO_LONG = [
    ("/v1/ask", {"kb": "policies", "question": "Refund?", "history": [["Q" * 4001, "A"]]}),
    ("/v1/ask", {"kb": "policies", "question": "Refund?", "history": [["Q", "A" * 4001]]}),
    ("/v1/ask", {"kb": "policies", "question": "Refund?", "history": [["Q", "A"]] * 51}),
    ("/v1/ask", {"kb": "policies", "question": "Refund?", "stage": "s" * 65}),
    ("/v1/chat/completions", {"model": "policies", "messages": [{"role": "user", "content": "x" * 16001}]}),
    ("/v1/chat/completions", {"model": "policies", "messages": [{"role": "user", "content": "x" * 4001}]}),
    ("/v1/chat/completions", {"model": "policies", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}] * 51}]}),
    ("/v1/chat/completions", {"model": "policies", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a" * 16001}]}]}),
    ("/v1/chat/completions", {"model": "policies", "user": "u" * 257, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "p" * 65, "messages": [{"role": "user", "content": "hi"}]}),
]
"""Requests with one field over its limit (each is 422)."""


def test_length_limits_on_everything_a_client_sends(server):
    c = client(server, "reader")
    for route, body in TOO_LONG:
        r = c.post(route, json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (route, r.text[:300])
    ok = {"model": "policies", "user": "u" * 256,
          "messages": [{"role": "user", "content": [{"type": "text", "text": "Refund?"}]}]}
    assert c.post("/v1/chat/completions", json=ok).status_code == 200  # at the limits: accepted


def test_json_bodies_are_capped_and_the_schema_shows_the_limits(server):
    r = client(server, "reader").post("/v1/ask",
                                      json={"kb": "policies", "question": "Refund?", "pad": "x" * MAX_JSON_BODY})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    schema = client(server).get("/openapi.json").json()
    parts = schema["components"]["schemas"]
    history = parts["AskRequest"]["properties"]["history"]
    assert history["maxItems"] == 50 and all(i["maxLength"] == 4000 for i in history["items"]["prefixItems"])
    assert parts["ChatRequest"]["properties"]["user"]["anyOf"][0]["maxLength"] == 256
    content = parts["ChatMessage"]["properties"]["content"]["anyOf"]
    assert content[0]["maxLength"] == 16000 and content[1]["maxItems"] == 50
    assert parts["ContentPart"]["properties"]["text"]["anyOf"][0]["maxLength"] == 16000
    ask = schema["paths"]["/v1/ask"]["post"]["responses"]
    assert {"401", "403", "404", "413", "422"} <= set(ask) and "text/event-stream" in ask["200"]["content"]
    assert ask["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


# 5. uploads: content-hash identity, a failed upload keeps the previous version ---------------------
def upload(base: str, name: str, data: bytes, **form: str) -> httpx.Response:
    return client(base, "writer").post("/v1/kbs/policies/documents", files={"files": (name, data, "text/plain")},
                                       data=form)


def docs_named(base: str, name: str) -> list[dict]:
    return [d for d in client(base, "reader").get("/v1/kbs/policies/documents").json()["documents"]
            if d["source"] == name]


def test_same_name_different_files_are_two_documents_and_identical_reupload_is_a_no_op(server):
    a = upload(server, "notes.txt", b"The canteen opens at eight o'clock every weekday morning.")
    b = upload(server, "notes.txt", b"Visitors must sign in at the reception desk on arrival.")
    assert a.status_code == b.status_code == 200 and a.json()["ingested"] == b.json()["ingested"] == 1
    assert a.json()["doc_ids"] != b.json()["doc_ids"]
    assert (sorted(d["doc_id"] for d in docs_named(server, "notes.txt"))
            == sorted(a.json()["doc_ids"] + b.json()["doc_ids"]))
    again = upload(server, "notes.txt", b"Visitors must sign in at the reception desk on arrival.")
    assert again.status_code == 200 and again.json()["skipped"] == 1 and again.json()["ingested"] == 0
    assert again.json()["skipped_doc_ids"] == b.json()["doc_ids"]  # the client learns the id it already has
    assert len(docs_named(server, "notes.txt")) == 2
    long_name = "政策" * 60 + ".txt"  # 363 bytes of UTF-8: over what a file system allows
    r = upload(server, long_name, b"Lockers are emptied every Friday evening by the facilities team.")
    assert r.status_code == 200 and r.json()["ingested"] == 1
    listed = client(server, "reader").get("/v1/kbs/policies/documents").json()["documents"]
    assert docs_named(server, long_name) == [] and any(
        d["source"].startswith("政策政策") and d["source"].endswith(".txt") and len(d["source"].encode()) <= 200
        for d in listed)


def test_a_missing_kb_is_a_404_without_server_paths(server, settings):
    for r in (client(server, "admin").get("/v1/kbs/nokb/documents"),
              client(server, "admin").post("/v1/ask", json={"kb": "nokb", "question": "Refund?"}),
              client(server, "admin").delete("/v1/kbs/nokb/documents/abc")):
        assert r.status_code == 404, r.text
        assert str(settings.home) not in r.text and "/" not in r.json()["error"]["message"]


def stored_path(settings, doc_id: str) -> Path:
    from retrieval.knowledge_base import KnowledgeBase

    return Path(KnowledgeBase(settings, "policies").document(doc_id)["path"])


def test_a_failed_reupload_keeps_the_previous_file_and_replace_swaps_after_success(server, settings):
    good = upload(server, "faq.txt", b"Parking is free for visitors in the north car park.").json()["doc_ids"][0]
    path = stored_path(settings, good)
    assert path.is_file() and path.name == "faq.txt" and path.parent.name == good
    bad = upload(server, "faq.txt", b"")  # unreadable: nothing changes
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "unreadable_document"
    assert path.read_bytes() == b"Parking is free for visitors in the north car park."
    bad = upload(server, "faq.txt", b"", replace=good)  # a failed replacement keeps the old version
    assert bad.status_code == 422 and path.is_file() and [d["doc_id"] for d in docs_named(server, "faq.txt")] == [good]
    assert upload(server, "faq.txt", b"x", replace="0" * 16).status_code == 404
    new = upload(server, "faq.txt", b"Parking costs two euros per hour in the north car park.", replace=good)
    assert new.status_code == 200, new.text
    new_id = new.json()["doc_ids"][0]
    assert [d["doc_id"] for d in docs_named(server, "faq.txt")] == [new_id]
    assert not path.parent.exists() and stored_path(settings, new_id).is_file()
    new_path = stored_path(settings, new_id)
    assert client(server, "writer").delete(f"/v1/kbs/policies/documents/{new_id}").status_code == 200
    assert not new_path.parent.exists()  # deleting a document removes its upload folder


def test_the_streamlit_call_of_service_upload_still_works(settings, kb):
    """ui/app.py calls `svc.upload(name, [(file name, BytesIO)], on_file=...)`."""
    import io

    seen = []
    out = Service(settings).upload("policies", [("hours.txt", io.BytesIO(b"The shop opens at nine o'clock."))],
                                   on_file=lambda path, status: seen.append(status))
    assert out["ingested"] == 1 and len(out["doc_ids"]) == 1 and "ingested" in seen


# 7. a withheld reply never leaves the server ------------------------------------------------------
class UngroundedLLM:
    name = "ungrounded"

    def generate(self, messages) -> str:
        return "".join(UNGROUNDED)

    def stream(self, messages):
        yield from UNGROUNDED


def test_a_withheld_reply_is_in_no_response_byte(settings, kb):
    app = create_app(settings, service=Service(settings, llm=UngroundedLLM()), keys=KeyRing(KEYS))
    q = "How long does a refund take?"
    calls = [("/v1/ask", {"kb": "policies", "question": q}),
             ("/v1/ask", {"kb": "policies", "question": q, "stream": True}),
             ("/v1/chat/completions", {"model": "policies", "messages": [{"role": "user", "content": q}]}),
             ("/v1/chat/completions",
              {"model": "policies", "stream": True, "messages": [{"role": "user", "content": q}]})]
    with serving(app) as base:
        c = client(base, "reader")
        for route, body in calls:
            r = c.post(route, json=body)
            assert r.status_code == 200 and "fallback" in r.text
            for piece in UNGROUNDED:
                assert piece.strip() not in r.text and piece.strip().encode() not in r.content, (route, body)


# 6. schemathesis against the server's own OpenAPI schema --------------------------------------------
def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    out = fuzz(server, "admin", max_examples=8, seed=12, workdir=tmp_path)
    assert out["cases"] > 100, out
    assert out["failures"] == [], json.dumps(out["failures"], indent=1)[:4000]


def test_a_write_while_another_writer_holds_the_kb_is_a_503_without_paths(settings, kb):
    from kb.writelock import write_lock

    settings.retrieval.write_lock_timeout_s = 0.5
    with serving(create_app(settings, keys=KeyRing(KEYS))) as base, write_lock(kb.dir, 5):
        r = upload(base, "late.txt", b"The library closes at eight in the evening on weekdays.")
        assert r.status_code == 503 and r.headers["retry-after"] == "30"
        assert r.json()["error"]["code"] == "busy" and str(settings.home) not in r.text
