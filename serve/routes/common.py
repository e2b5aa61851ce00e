"""What every router shares: the API's own error, the error body's schema and OpenAPI helpers,
server-sent events, and who an edit is recorded as."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field


class ApiError(Exception):
    """An error answered with `status` and the JSON error body `{"error": {"code", "message"}}`."""

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


def with_sse(description: str, event: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or server-sent events (each described by `event`) when the request asks for `stream`."""
    return {200: {"description": description,
                  "content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": event}}}}


# server-sent events --------------------------------------------------------------------------------
def sse(event: dict) -> str:
    """One server-sent event whose data is `event` as JSON."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def event_stream(events: Iterator[str]) -> StreamingResponse:
    """A text/event-stream response that proxies must not buffer."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def extension(result: dict) -> dict:
    """The chain result's keys an OpenAI-style reply carries under `kb`."""
    return {k: result[k] for k in ("sources", "fallback", "reason", "confidence", "mode", "faq") if k in result}


def key_user(key: str, user: str | None = None) -> str:
    """Who an API edit is recorded as: the key's fingerprint (never the key), after `user` when given.
    `user`'s control characters and brackets become spaces, so the fingerprint in brackets at the
    end is the only one and no line of a listing can be forged."""
    fp = f"api-key:{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    name = " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f()\[\]]", " ", user or "").split())
    return f"{name} ({fp})" if name else fp
