"""Pure ASGI middleware of the HTTP API: a request id on every request, a body-size limit that
holds for any transfer encoding, and a last-resort 500 that shows no internals.

`RequestIdMiddleware` takes a well-formed incoming `X-Request-ID` (or makes one), returns it in the
response header, puts it in the log records of the request (`record.request_id`, through a
contextvar and the log record factory) and in error bodies (`error.request_id`).

`BodyLimitMiddleware` counts the body bytes as the application reads them (`receive`), so a
chunked upload with no Content-Length is refused as soon as the count passes the limit, not after
the whole body was read.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:=/+-]{1,128}$")


def current_request_id() -> str | None:
    """The id of the request being served in this context, or None outside a request."""
    return REQUEST_ID.get()


def error_body(code: str, message: str, **extra: Any) -> dict:
    """The API's error JSON, with the current request id when there is one."""
    rid = current_request_id()
    return {"error": {"code": code, "message": message, **({"request_id": rid} if rid else {}), **extra}}


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID when it is well formed (1-128 safe characters), else a new one."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if VALID_REQUEST_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute ("-" outside a request), for log formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id() or "-"
        return True


def install_log_context() -> None:
    """Make every log record carry the current request id as `record.request_id` (once per process)."""
    old = logging.getLogRecordFactory()
    if getattr(old, "adds_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old(*args, **kwargs)
        record.request_id = current_request_id() or "-"
        return record

    factory.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete JSON response; `Connection: close`, as the request body may be left unread."""
    data = json.dumps(body, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class RequestIdMiddleware:
    """Request id in a contextvar, the response header and error bodies; an unhandled exception
    becomes a 500 whose message names the request id, its details going to the log only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope)
        token = REQUEST_ID.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error (request %s)", rid)
            if started:
                raise
            await send_json(send_with_id, 500, internal_error_body())
        finally:
            REQUEST_ID.reset(token)


def internal_error_body() -> dict:
    """The 500 body: a generic message that names the request id (the details are in the log)."""
    rid = current_request_id()
    return error_body("internal_error", f"internal server error (request id {rid or 'unknown'}); "
                                        "the details are in the server log")


class BodyTooLarge(Exception):
    """Raised from `receive` once a request body passes its limit."""


@dataclass
class BodyStats:
    """What the body limit refused: a count, and the last refusal's bytes read and limit."""

    refused: int = 0
    last_read: int = 0
    last_limit: int = 0

    def record(self, read: int, limit: int) -> None:
        self.refused += 1
        self.last_read, self.last_limit = read, limit


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when absent or malformed."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimitMiddleware:
    """413 `payload_too_large` for a body over `limit_for(scope)` bytes: at once by Content-Length,
    else as soon as the bytes read pass the limit (chunked or any other transfer encoding)."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int], stats: BodyStats | None = None) -> None:
        self.app = app
        self.limit_for = limit_for
        self.stats = stats if stats is not None else BodyStats()

    async def refuse(self, send: Send, size: int, limit: int, exact: bool) -> None:
        self.stats.record(size, limit)
        what = f"the request body ({size} bytes)" if exact else f"the request body (over {size} bytes read so far)"
        await send_json(send, 413, error_body("payload_too_large", f"{what} is over the {limit}-byte limit "
                                                                   "of this route"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        size = declared_length(scope)
        if size is not None and size > limit:
            await self.refuse(send, size, limit, exact=True)
            return
        read, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal read, over
            if over:
                raise BodyTooLarge(read)
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    over = True
                    raise BodyTooLarge(read)
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:  # the app's own answer to the cut-off body is replaced by the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self.refuse(send, read, limit, exact=False)
