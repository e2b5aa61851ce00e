"""The HTTP API (FastAPI), as DESIGN.md states it.

Every route but /healthz needs `Authorization: Bearer KEY`; a key reads (and with ":rw" writes)
the knowledge bases it is granted. Errors are JSON `{"error": {"code", "message", "request_id"}}`
without internals; every response carries `X-Request-ID` (the client's, when well formed). Request
bodies are limited while they are read (serve.max_upload_mb for uploads, 8 MiB for JSON), whatever
the transfer encoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from kb.paths import KB_NAME_PATTERN, BadKBName, check_kb_name
from kb.settings import ConfigError, Settings
from kb.writelock import WriteLockTimeout
from retrieval.kb import MAX_CHUNK_TEXT, MAX_USER, BadChunkText, NoSuchChunk, NoSuchKB
from serve.auth import NO_KEYS, Grant, KeyRing
from serve.chain import public
from serve.middleware import (BodyLimitMiddleware, BodyStats, RequestIdMiddleware, RequestIdFilter, Scope,
                              error_body, install_log_context, internal_error_body)
from serve.service import Service
from serve.uploads import BadFileName, BadUpload, NoSuchDocument, UploadTooLarge

log = logging.getLogger(__name__)
MULTIPART_SLACK = 1 << 16  # boundaries and part headers on top of the file bytes
MAX_JSON_BODY = 8 << 20
"""The largest body of a JSON route (every field has its own limit below as well)."""
MAX_TEXT = 4000
"""The longest question, and each question and answer of `history`."""
MAX_MESSAGE = 16000
"""The longest chat message text (a string, or each text part)."""
MAX_PARTS = 50
"""The most content parts of one chat message."""
UPLOAD_PATH = re.compile(r"/v1/kbs/[^/]+/documents/?$")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# the error body, for the OpenAPI schema ------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="a stable machine-readable code, e.g. not_found, payload_too_large")
    message: str = Field(description="what went wrong, for people; never internals")
    request_id: str | None = Field(default=None, description="the request's id (also the X-Request-ID header)")
    details: list[dict[str, Any]] | None = Field(default=None, description="invalid_request: each problem")


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {400: "the request body could not be parsed", 401: "missing or invalid API key",
          403: "the key may not read (or change) this knowledge base", 404: "no such knowledge base or document",
          413: "the request body is over the limit", 422: "invalid request"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses, all with the ErrorBody schema."""
    return {c: {"model": ErrorBody, "description": ERRORS[c]} for c in codes}


def sse_event(data: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI (3.1) schema of one server-sent event whose `data` is described by `data`."""
    return {"type": "object", "required": ["data"],
            "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}}}


def json_text(schema: dict[str, Any]) -> dict[str, Any]:
    """A string holding a JSON document that `schema` describes."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


ASK_EVENT = sse_event(json_text({
    "type": "object", "required": ["type"],
    "properties": {"type": {"enum": ["delta", "final", "error"]}, "text": {"type": "string"},
                   "replace": {"type": "boolean"}, "error": {"$ref": "#/components/schemas/ErrorDetail"}}}))
"""/v1/ask with `stream`: `delta` events, then one `final` (or `error`) event."""
CHAT_EVENT = sse_event({"anyOf": [{"const": "[DONE]"}, json_text({
    "type": "object", "properties": {"object": {"const": "chat.completion.chunk"}, "choices": {"type": "array"},
                                     "error": {"$ref": "#/components/schemas/ErrorDetail"}}})]})
"""/v1/chat/completions with `stream`: chat.completion.chunk events (or an error event), then `[DONE]`."""


def with_sse(description: str, event: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or server-sent events (each described by `event`) when the request asks for `stream`."""
    return {200: {"description": description,
                  "content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": event}}}}


# request bodies ----------------------------------------------------------------------------------
KBName = Annotated[str, Field(min_length=1, max_length=64, pattern=KB_NAME_PATTERN)]
Turn = Annotated[str, Field(max_length=MAX_TEXT)]


class AskRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"kb": "policies", "question": "How long does a refund take?"}]})
    kb: KBName
    question: str = Field(min_length=1, max_length=MAX_TEXT)
    history: list[tuple[Turn, Turn]] = Field(default_factory=list, max_length=50,
                                             description="earlier [question, answer] pairs, oldest first")
    stage: str | None = Field(default=None, max_length=64)
    stream: StrictBool = Field(default=False, description="server-sent events: delta events, then one final event")


class SearchRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"kb": "policies", "query": "refund time", "k": 3}]})
    kb: KBName
    query: str = Field(min_length=1, max_length=MAX_TEXT)
    k: StrictInt = Field(default=5, ge=1, le=100)


class ContentPart(BaseModel):
    """One part of a message's content; only `text` parts are read, others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = Field(default=None, max_length=MAX_MESSAGE)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: (Annotated[str, Field(max_length=MAX_MESSAGE)] | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)]
              | None) = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "policies", "messages": [{"role": "user", "content": "How long does a refund take?"}]}]})
    model: KBName = Field(description="the knowledge base to answer from")
    messages: list[ChatMessage] = Field(min_length=1, max_length=100,
                                        description=f"the last user message is the question (at most {MAX_TEXT} "
                                                    "characters)")
    stream: StrictBool = False
    stage: str | None = Field(default=None, max_length=64, description="dialogue stage for the fallback reply")
    # accepted for compatibility; the server's generation settings apply
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    max_tokens: StrictInt | None = None
    user: str | None = Field(default=None, max_length=256)


class ChunkEditRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"text": "Refunds reach the card within five working days."}]})
    text: str = Field(min_length=1, max_length=MAX_CHUNK_TEXT, pattern=r"\S",
                      description="the chunk's new text (not only white space)")
    user: str | None = Field(default=None, max_length=MAX_USER - 40,
                             description="who edits, recorded beside the API key's fingerprint")


class Health(BaseModel):
    status: Literal["ok"]
    llm: Literal["local", "openai", "extractive"] = Field(description="the answer backend's kind")


def split_chat(messages: list[ChatMessage]) -> tuple[str, list[list[str]]]:
    """The last user message, and the earlier user/assistant turns as [question, answer] pairs.

    System messages are not passed on: the chain's own grounded prompt governs the answer.
    """
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users or not messages[users[-1]].text().strip():
        raise ApiError(422, "invalid_request", "messages must contain a non-empty user message")
    last = users[-1]
    if len(messages[last].text()) > MAX_TEXT:
        raise ApiError(422, "invalid_request", f"the last user message is over {MAX_TEXT} characters")
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
KBPath = Annotated[str, PathParam(min_length=1, max_length=64, pattern=KB_NAME_PATTERN, examples=["policies"],
                                  description="the knowledge base's name")]
DocPath = Annotated[str, PathParam(min_length=1, max_length=128, description="the document's id")]
OrdPath = Annotated[int, PathParam(ge=0, le=10**9, description="the chunk's ord, as GET .../chunks lists it")]
UPLOAD_FORM = {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": 100},
    "replace": {"type": "string", "minLength": 1, "maxLength": 64,
                "description": "the doc_id of a document this (single) file replaces once it is ingested"}}}

UPLOAD_LINKS = {
    "ListDocuments": {"operationRef": "#/paths/~1v1~1kbs~1{kb}~1documents/get",
                      "parameters": {"kb": "$request.path.kb"}},
    "DeleteDocument": {"operationRef": "#/paths/~1v1~1kbs~1{kb}~1documents~1{doc_id}/delete",
                       "parameters": {"kb": "$request.path.kb", "doc_id": "$response.body#/doc_ids/0"}},
}
"""OpenAPI links from an upload to its KB's documents and to deleting what it added."""


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods of every route whose path matches the request's."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.router.routes:
        if route.matches(scope)[0] is Match.PARTIAL:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def validation_details(errs: list[dict]) -> list[dict]:
    """Each validation problem's location and message, bounded: never the input itself."""
    return [{"loc": [str(p)[:64] for p in list(x.get("loc", ()))[:8]], "msg": str(x.get("msg", ""))[:200]}
            for x in errs[:10]]


# the app -----------------------------------------------------------------------------------------
def create_app(settings: Settings, service: Service | None = None, keys: KeyRing | None = None) -> FastAPI:
    keys = keys if keys is not None else KeyRing.from_settings(settings)
    if not len(keys):
        raise ConfigError(NO_KEYS)
    svc = service or Service(settings)
    max_upload = int(settings.serve.max_upload_mb * 2**20) + MULTIPART_SLACK
    install_log_context()
    app = FastAPI(title="Knowledge-base API", version="1.0",
                  description="Grounded, compliant answers from a company's own documents.")
    app.state.service = svc
    app.state.keys = keys
    app.state.body_stats = BodyStats()
    if settings.serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.serve.cors_origins,
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["X-Request-ID"])

    def body_limit(scope: Scope) -> int:
        """Uploads: serve.max_upload_mb and the multipart framing; everything else: MAX_JSON_BODY."""
        upload = scope.get("method") in ("POST", "PUT") and UPLOAD_PATH.search(scope.get("path", ""))
        return max_upload if upload else MAX_JSON_BODY

    # the last added runs first: request id, then the body limit, then CORS and the routes
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit, stats=app.state.body_stats)
    app.add_middleware(RequestIdMiddleware)

    # errors ----------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(error_body(e.code, e.message), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = validation_details(e.errors())
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs) or "invalid request"
        return JSONResponse(error_body("invalid_request", msg, details=errs), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large"}.get(e.status_code, f"http_{e.status_code}")
        headers = dict(e.headers or {})
        if e.status_code == 405:  # every method of the path, not only those of the first route that matched it
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return JSONResponse(error_body(code, str(e.detail)[:300]), status_code=e.status_code, headers=headers)

    @app.exception_handler(WriteLockTimeout)
    async def _busy(request: Request, e: WriteLockTimeout) -> JSONResponse:  # no lock-file path in the body
        log.warning("write lock busy: %s", e)
        kb = request.path_params.get("kb", "")
        return JSONResponse(error_body("busy", f"knowledge base {kb!r} is being written by another process; "
                                               "try again later"), status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:  # a backstop: RequestIdMiddleware answers first
        log.exception("internal error")
        return JSONResponse(internal_error_body(), status_code=500)

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
            raise ApiError(404, "not_found", f"no knowledge base {kb!r}") from e

    # routes ----------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["meta"])
    def healthz() -> Health:
        """Liveness, and the answer backend's kind (no model path or endpoint URL)."""
        return Health(status="ok", llm=svc.llm_kind)

    @app.get("/v1/kbs", tags=["knowledge bases"], responses=errors(401))
    def kbs(g: Auth) -> dict:
        return {"kbs": [k for k in svc.kbs() if g.can_read(k["name"])]}

    @app.get("/v1/kbs/{kb}/documents", tags=["knowledge bases"], responses=errors(401, 403, 404, 422))
    def documents(kb: KBPath, g: Auth) -> dict:
        permitted(g, kb)
        try:
            docs = svc.kb(kb).documents()
        except NoSuchKB as e:
            raise ApiError(404, "not_found", f"no knowledge base {kb!r}") from e
        return {"kb": kb, "documents": [{k: v for k, v in d.items() if k != "path"} for d in docs]}

    @app.post("/v1/kbs/{kb}/documents", tags=["knowledge bases"],
              responses={200: {"description": "the `kb ingest` JSON", "links": UPLOAD_LINKS},
                         **errors(400, 401, 403, 404, 413, 422)},
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": UPLOAD_FORM}}}})
    async def upload(kb: KBPath, request: Request, g: Auth) -> dict:
        """Upload one or more files (multipart field `files` or `file`); returns the `kb ingest` JSON.

        A document is identified by its content: an identical re-upload is skipped, two different
        files of the same name are two documents. With the form field `replace` (a doc_id) and one
        file, that document is removed once the new one was ingested (`replaced` in the result);
        a file that cannot be read leaves everything as it was.
        """
        permitted(g, kb, write=True)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(422, "invalid_request", "send the files as multipart/form-data (field 'files')")
        form = await request.form(max_files=100, max_fields=20)
        try:
            ups = [u for u in form.getlist("files") + form.getlist("file") if hasattr(u, "read")]
            if not ups:
                raise ApiError(422, "invalid_request", "no file in the multipart field 'files'")
            replace = form.get("replace")
            if replace is not None and (not isinstance(replace, str) or not 0 < len(replace) <= 64):
                raise ApiError(422, "invalid_request", "'replace' must be a document id (1-64 characters)")
            files = [(u.filename, u.file) for u in ups]
            try:
                out = await run_in_threadpool(svc.upload, kb, files, replace=replace)
            except UploadTooLarge as e:
                raise ApiError(413, "payload_too_large", str(e)) from e
            except (BadFileName, BadUpload) as e:
                raise ApiError(422, "invalid_request", str(e)) from e
            except NoSuchDocument as e:
                raise ApiError(404, "not_found", str(e)) from e
        finally:
            await form.close()
        if out["failed"] and not out["ingested"] and not out["skipped"]:
            reasons = "; ".join(f"{f['path']}: {f['error']}" for f in out["failed"])
            raise ApiError(422, "unreadable_document", reasons)
        return out

    @app.delete("/v1/kbs/{kb}/documents/{doc_id}", tags=["knowledge bases"], responses=errors(401, 403, 404, 422))
    def delete_document(kb: KBPath, doc_id: str, g: Auth) -> dict:
        permitted(g, kb, write=True)
        try:
            ok = svc.remove_document(kb, doc_id)
        except NoSuchKB as e:
            raise ApiError(404, "not_found", f"no knowledge base {kb!r}") from e
        if not ok:
            raise ApiError(404, "not_found", f"no document {doc_id!r} in knowledge base {kb!r}")
        return {"removed": {"kb": kb, "doc_id": doc_id}}

    @app.get("/v1/kbs/{kb}/documents/{doc_id}/chunks", tags=["knowledge bases"],
             responses=errors(401, 403, 404, 422))
    def chunks(kb: KBPath, doc_id: DocPath, g: Auth) -> dict:
        """A document's chunks with their key information (the `kb chunks --json` document)."""
        permitted(g, kb)
        try:
            return svc.kb(kb).chunks(doc_id)
        except NoSuchKB as e:
            raise ApiError(404, "not_found", f"no knowledge base {kb!r}") from e
        except NoSuchChunk as e:
            raise ApiError(404, "not_found", str(e)) from e

    @app.put("/v1/kbs/{kb}/documents/{doc_id}/chunks/{ord}", tags=["knowledge bases"],
             responses=errors(400, 401, 403, 404, 413, 422))
    def edit_chunk(kb: KBPath, doc_id: DocPath, ord: OrdPath, body: ChunkEditRequest, g: Auth,
                   cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> dict:
        """Replace a chunk's text: its key information and index entries are rebuilt, the edit is
        audited (the user is the API key's fingerprint, with `user` when given) and survives
        re-ingesting the document (the `kb chunks edit --json` document)."""
        permitted(g, kb, write=True)
        who = key_user(cred.credentials if cred else "", body.user)
        try:
            return svc.kb(kb).edit_chunk(doc_id, ord, body.text, who)
        except NoSuchKB as e:
            raise ApiError(404, "not_found", f"no knowledge base {kb!r}") from e
        except NoSuchChunk as e:
            raise ApiError(404, "not_found", str(e)) from e
        except BadChunkText as e:
            raise ApiError(422, "invalid_request", str(e)) from e

    @app.post("/v1/search", tags=["answers"], responses=errors(400, 401, 403, 404, 413, 422))
    def search(body: SearchRequest, g: Auth) -> dict:
        permitted(g, body.kb)
        chain = chain_for(body.kb)
        return {"hits": [h.to_json() for h in chain.kb.search(body.query, body.k)]}

    @app.post("/v1/ask", tags=["answers"],
              responses={**with_sse("the `kb ask` JSON, or with `stream` server-sent events", ASK_EVENT),
                         **errors(400, 401, 403, 404, 413, 422)})
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
                yield sse({"type": "error", **internal_error_body()})

        return event_stream(events())

    @app.get("/v1/models", tags=["openai"], responses=errors(401))
    def models(g: Auth) -> dict:
        """The readable knowledge bases, as OpenAI models (a chat completion's `model` names one)."""
        return {"object": "list", "data": [{"id": k["name"], "object": "model", "created": 0, "owned_by": "kb"}
                                           for k in svc.kbs() if g.can_read(k["name"])]}

    @app.post("/v1/chat/completions", tags=["openai"],
              responses={**with_sse("a chat completion, or with `stream` its chunks as server-sent events", CHAT_EVENT),
                         **errors(400, 401, 403, 404, 413, 422)})
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
                yield sse(internal_error_body())
            yield "data: [DONE]\n\n"

        return event_stream(events())

    return app


def key_user(key: str, user: str | None = None) -> str:
    """Who an API edit is recorded as: the key's fingerprint (never the key), after `user` when given.
    `user`'s control characters and brackets become spaces, so the fingerprint in brackets at the
    end is the only one and no line of a listing can be forged."""
    fp = f"api-key:{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    name = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f()\[\]]", " ", user or "").split())
    return f"{name} ({fp})" if name else fp


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def event_stream(events: Iterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def extension(result: dict) -> dict:
    return {k: result[k] for k in ("sources", "fallback", "reason", "confidence", "mode", "faq") if k in result}


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the API with uvicorn (blocking)."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=host or settings.serve.host, port=port or settings.serve.port, log_level="info",
                log_config=log_config())


def log_config() -> dict:
    """uvicorn's logging configuration with the request id in every line, and the application's
    warnings and errors (with their request id) on the same console."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["filters"] = {"request_id": {"()": RequestIdFilter}}
    for handler in cfg["handlers"].values():
        handler["filters"] = ["request_id"]
    cfg["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(name)s: %(message)s"
    cfg["formatters"]["access"]["fmt"] = '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'
    cfg["loggers"][""] = {"handlers": ["default"], "level": "WARNING"}
    return cfg
