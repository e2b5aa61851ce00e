"""The HTTP API (FastAPI), as DESIGN.md states it.

Every route but /healthz needs `Authorization: Bearer KEY`; a key reads (and with ":rw" writes)
the knowledge bases it is granted. Errors are JSON `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kb.paths import BadKBName, check_kb_name
from kb.settings import ConfigError, Settings
from retrieval.kb import NoSuchKB
from serve.auth import Grant, KeyRing
from serve.chain import public
from serve.service import Service
from serve.uploads import BadFileName, UploadTooLarge

log = logging.getLogger(__name__)
MULTIPART_SLACK = 1 << 16  # boundaries and part headers on top of the file bytes


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str, **extra: Any) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


# request bodies ----------------------------------------------------------------------------------
class AskRequest(BaseModel):
    kb: str = Field(min_length=1, max_length=64)
    question: str = Field(min_length=1, max_length=4000)
    history: list[tuple[str, str]] = Field(default_factory=list, max_length=50)
    stage: str | None = Field(default=None, max_length=64)
    stream: bool = Field(default=False, description="server-sent events: delta events, then one final event")


class SearchRequest(BaseModel):
    kb: str = Field(min_length=1, max_length=64)
    query: str = Field(min_length=1, max_length=4000)
    k: int = Field(default=5, ge=1, le=100)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model: str = Field(min_length=1, max_length=64, description="the knowledge base to answer from")
    messages: list[ChatMessage] = Field(min_length=1, max_length=100)
    stream: bool = False
    stage: str | None = Field(default=None, max_length=64, description="dialogue stage for the fallback reply")
    # accepted for compatibility; the server's generation settings apply
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    user: str | None = None


def split_chat(messages: list[ChatMessage]) -> tuple[str, list[list[str]]]:
    """The last user message, and the earlier user/assistant turns as [question, answer] pairs.

    System messages are not passed on: the chain's own grounded prompt governs the answer.
    """
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users or not messages[users[-1]].text().strip():
        raise ApiError(422, "invalid_request", "messages must contain a non-empty user message")
    last = users[-1]
    history, q = [], None
    for m in messages[:last]:
        if m.role == "user":
            q = m.text()
        elif m.role == "assistant" and q is not None:
            history.append([q, m.text()])
            q = None
    return messages[last].text(), history


# auth --------------------------------------------------------------------------------------------
bearer = HTTPBearer(auto_error=False, description="an API key from serve.api_keys / KB_API_KEYS")


def grant(request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Grant:
    g = request.app.state.keys.grant(cred.credentials if cred else None)
    if g is None:
        raise ApiError(401, "unauthorized", "missing or invalid API key (send 'Authorization: Bearer KEY')")
    return g


Auth = Annotated[Grant, Depends(grant)]


# the app -----------------------------------------------------------------------------------------
def create_app(settings: Settings, service: Service | None = None, keys: KeyRing | None = None) -> FastAPI:
    keys = keys if keys is not None else KeyRing.from_settings(settings)
    if not len(keys):
        raise ConfigError("no API keys configured: set serve.api_keys in the config or KB_API_KEYS "
                          '(JSON, e.g. {"my-key": ["*:rw"]})')
    svc = service or Service(settings)
    max_body = int(settings.serve.max_upload_mb * 2**20)
    app = FastAPI(title="Knowledge-base API", version="1.0",
                  description="Grounded, compliant answers from a company's own documents.")
    app.state.service = svc
    app.state.keys = keys
    if settings.serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.serve.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])

    # errors ----------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(error_body(e.code, e.message), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = [{"loc": list(x.get("loc", ())), "msg": x.get("msg", "")} for x in e.errors()]
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs) or "invalid request"
        return JSONResponse(error_body("invalid_request", msg, details=errs), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, f"http_{e.status_code}")
        return JSONResponse(error_body(code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body("internal_error", f"{type(e).__name__}: {e}"), status_code=500)

    # upload size: refuse by Content-Length before reading; count the bytes when it is absent --------
    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        if request.method in ("POST", "PUT"):
            cl = request.headers.get("content-length")
            if cl and cl.isdigit() and int(cl) > max_body + MULTIPART_SLACK:
                return JSONResponse(error_body("payload_too_large", f"the request body ({int(cl)} bytes) is over "
                                               f"the {settings.serve.max_upload_mb:g} MiB upload limit"), status_code=413)
        return await call_next(request)

    def permitted(g: Grant, kb: str, write: bool = False) -> str:
        """`kb` if its name is valid (else 422) and the key may read it, or change it (else 403)."""
        try:
            check_kb_name(kb)
        except BadKBName as e:
            raise ApiError(422, "invalid_request", str(e)) from e
        if not (g.can_write(kb) if write else g.can_read(kb)):
            raise ApiError(403, "forbidden", f"this key may not {'change' if write else 'read'} knowledge base {kb!r}")
        return kb

    def chain_for(kb: str):
        try:
            return svc.chain(kb)
        except NoSuchKB as e:
            raise ApiError(404, "not_found", str(e)) from e

    # routes ----------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict:
        return {"status": "ok", "llm": svc.llm.name if svc.llm else "extractive"}

    @app.get("/v1/kbs", tags=["knowledge bases"])
    def kbs(g: Auth) -> dict:
        return {"kbs": [k for k in svc.kbs() if g.can_read(k["name"])]}

    @app.get("/v1/kbs/{kb}/documents", tags=["knowledge bases"])
    def documents(kb: str, g: Auth) -> dict:
        permitted(g, kb)
        try:
            docs = svc.kb(kb).documents()
        except NoSuchKB as e:
            raise ApiError(404, "not_found", str(e)) from e
        return {"kb": kb, "documents": [{k: v for k, v in d.items() if k != "path"} for d in docs]}

    @app.post("/v1/kbs/{kb}/documents", tags=["knowledge bases"],
              openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["files"],
                  "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def upload(kb: str, request: Request, g: Auth) -> dict:
        """Upload one or more files (multipart field `files` or `file`); returns the `kb ingest` JSON."""
        permitted(g, kb, write=True)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(422, "invalid_request", "send the files as multipart/form-data (field 'files')")
        form = await request.form(max_files=100, max_fields=20)
        try:
            ups = [u for u in form.getlist("files") + form.getlist("file") if hasattr(u, "read")]
            if not ups:
                raise ApiError(422, "invalid_request", "no file in the multipart field 'files'")
            files = [(u.filename, u.file) for u in ups]
            try:
                out = await run_in_threadpool(svc.upload, kb, files)
            except UploadTooLarge as e:
                raise ApiError(413, "payload_too_large", str(e)) from e
            except BadFileName as e:
                raise ApiError(422, "invalid_request", str(e)) from e
        finally:
            await form.close()
        if out["failed"] and not out["ingested"] and not out["skipped"]:
            reasons = "; ".join(f"{f['path']}: {f['error']}" for f in out["failed"])
            raise ApiError(422, "unreadable_document", reasons)
        return out

    @app.delete("/v1/kbs/{kb}/documents/{doc_id}", tags=["knowledge bases"])
    def delete_document(kb: str, doc_id: str, g: Auth) -> dict:
        permitted(g, kb, write=True)
        try:
            ok = svc.remove_document(kb, doc_id)
        except NoSuchKB as e:
            raise ApiError(404, "not_found", str(e)) from e
        if not ok:
            raise ApiError(404, "not_found", f"no document {doc_id!r} in knowledge base {kb!r}")
        return {"removed": {"kb": kb, "doc_id": doc_id}}

    @app.post("/v1/search", tags=["answers"])
    def search(body: SearchRequest, g: Auth) -> dict:
        permitted(g, body.kb)
        chain = chain_for(body.kb)
        return {"hits": [h.to_json() for h in chain.kb.search(body.query, body.k)]}

    @app.post("/v1/ask", tags=["answers"])
    def ask(body: AskRequest, g: Auth):
        """Retrieve, generate, check compliance: the `kb ask` JSON. With `"stream": true`, SSE:
        `{"type": "delta", "text"}` events as the answer is generated, then `{"type": "final", ...the
        JSON..., "replace"}`; `replace: true` means the text sent failed the final compliance check
        and the client must show `answer` (the fallback) instead."""
        permitted(g, body.kb)
        chain = chain_for(body.kb)
        history = [list(t) for t in body.history]
        if not body.stream:
            return public(chain.ask(body.question, history, body.stage))

        def events() -> Iterator[str]:
            try:
                for piece in chain.stream(body.question, history, body.stage):
                    ev = {"type": "final", **piece} if isinstance(piece, dict) else {"type": "delta", "text": piece}
                    yield sse(ev)
            except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
                log.exception("stream failed")
                yield sse({"type": "error", **error_body("internal_error", f"{type(e).__name__}: {e}")})

        return event_stream(events())

    @app.get("/v1/models", tags=["openai"])
    def models(g: Auth) -> dict:
        """The readable knowledge bases, as OpenAI models (a chat completion's `model` names one)."""
        return {"object": "list", "data": [{"id": k["name"], "object": "model", "created": 0, "owned_by": "kb"}
                                           for k in svc.kbs() if g.can_read(k["name"])]}

    @app.post("/v1/chat/completions", tags=["openai"])
    def chat(body: ChatRequest, g: Auth):
        """OpenAI-compatible chat completion answered from the knowledge base named by `model`.

        The response carries the chain's sources, `fallback` and `reason` under the extra key `kb`.
        Streaming follows `answer.stream_mode`; in `live` mode a reply that fails the final
        compliance check after it was streamed ends with a chunk whose `finish_reason` is
        `content_filter`, whose delta is the fallback reply (after a blank line) and whose `kb` has
        `replace: true` and `answer`: clients that read it show `answer` instead of the message.
        """
        permitted(g, body.model)
        question, history = split_chat(body.messages)
        chain = chain_for(body.model)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            r = chain.ask(question, history, body.stage)
            return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r["answer"]},
                                 "finish_reason": "stop"}],
                    "kb": extension(r)}

        def events() -> Iterator[str]:
            def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
                return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

            yield chunk({"role": "assistant", "content": ""})
            try:
                for piece in chain.stream(question, history, body.stage):
                    if not isinstance(piece, dict):
                        yield chunk({"content": piece})
                    elif piece["replace"]:  # live mode: what was sent failed the final check
                        yield chunk({"content": "\n\n" + piece["answer"]}, "content_filter",
                                    kb={**extension(piece), "replace": True, "answer": piece["answer"]})
                    else:
                        yield chunk({}, "stop", kb=extension(piece))
            except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
                log.exception("stream failed")
                yield sse(error_body("internal_error", f"{type(e).__name__}: {e}"))
            yield "data: [DONE]\n\n"

        return event_stream(events())

    return app


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def event_stream(events: Iterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def extension(result: dict) -> dict:
    return {k: result[k] for k in ("sources", "fallback", "reason", "confidence", "mode") if k in result}


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn (blocking)."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=host or settings.serve.host, port=port or settings.serve.port, log_level="info")
