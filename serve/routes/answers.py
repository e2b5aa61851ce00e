"""Search a knowledge base, and ask it (the `kb ask` JSON, or server-sent events)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import APIRouter

from serve.chain import AnswerChain
from serve.middleware import internal_error_body
from serve.routes.common import errors, event_stream, json_text, sse, sse_event, with_sse
from serve.routes.deps import Caller, Svc
from serve.routes.schemas import AskRequest, SearchRequest

log = logging.getLogger(__name__)
router = APIRouter(tags=["answers"])

ASK_EVENT = sse_event(json_text({
    "type": "object", "required": ["type"],
    "properties": {"type": {"enum": ["delta", "final", "error"]}, "text": {"type": "string"},
                   "replace": {"type": "boolean"}, "error": {"$ref": "#/components/schemas/ErrorDetail"}}}))
"""/v1/ask with `stream`: `delta` events, then one `final` (or `error`) event."""
ASK_RESPONSES = {**with_sse("the `kb ask` JSON, or with `stream` server-sent events", ASK_EVENT),
                 **errors(400, 401, 403, 404, 413, 422)}


@router.post("/v1/search", responses=errors(400, 401, 403, 404, 413, 422))
def search(body: SearchRequest, caller: Caller, svc: Svc) -> dict:
    """Retrieve passages: the `kb search --json` document."""
    chain = svc.chain(caller.readable(body.kb))
    return {"hits": [h.to_json() for h in chain.kb.search(body.query, body.k)]}


@router.post("/v1/ask", responses=ASK_RESPONSES)
def ask(body: AskRequest, caller: Caller, svc: Svc):
    """Retrieve, generate, check compliance: the `kb ask` JSON. With `"stream": true`, SSE:
    `{"type": "delta", "text"}` events as the answer is generated, then `{"type": "final", ...the
    JSON..., "replace"}`; `replace: true` means the text sent failed the final compliance check
    and the client must show `answer` (the fallback) instead."""
    chain = svc.chain(caller.readable(body.kb))
    history = [list(t) for t in body.history]
    if not body.stream:
        return chain.ask(body.question, history, body.stage).to_json()
    return event_stream(ask_events(chain, body, history))


def ask_events(chain: AnswerChain, body: AskRequest, history: list[list[str]]) -> Iterator[str]:
    """The streamed answer as server-sent events; a failure after the status line is reported in-band."""
    try:
        for piece in chain.stream(body.question, history, body.stage):
            yield sse({"type": "final", **piece} if isinstance(piece, dict) else {"type": "delta", "text": piece})
    except Exception:  # noqa: BLE001 - the status line is gone; report in-band
        log.exception("stream failed")
        yield sse({"type": "error", **internal_error_body()})
