"""The OpenAI-compatible routes: knowledge bases as models, and chat completions answered from them."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter

from serve.chain import AnswerChain
from serve.middleware import internal_error_body
from serve.routes.common import errors, event_stream, extension, json_text, sse, sse_event, with_sse
from serve.routes.deps import Auth, Caller, Svc
from serve.routes.schemas import ChatRequest, split_chat

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])

CHAT_EVENT = sse_event({"anyOf": [{"const": "[DONE]"}, json_text({
    "type": "object", "properties": {"object": {"const": "chat.completion.chunk"}, "choices": {"type": "array"},
                                     "error": {"$ref": "#/components/schemas/ErrorDetail"}}})]})
"""/v1/chat/completions with `stream`: chat.completion.chunk events (or an error event), then `[DONE]`."""
CHAT_RESPONSES = {**with_sse("a chat completion, or with `stream` its chunks as server-sent events", CHAT_EVENT),
                  **errors(400, 401, 403, 404, 413, 422)}


@dataclass(frozen=True)
class Completion:
    """The identity every object of one chat completion repeats."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def reply(self, result: dict) -> dict:
        """The whole chat completion for the chain's `result`."""
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                             "finish_reason": "stop"}],
                "kb": extension(result)}

    def chunk(self, delta: dict, finish: str | None = None, **extra: Any) -> str:
        """One chat.completion.chunk, as a server-sent event."""
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


@router.get("/v1/models", responses=errors(401))
def models(g: Auth, svc: Svc) -> dict:
    """The readable knowledge bases, as OpenAI models (a chat completion's `model` names one)."""
    return {"object": "list", "data": [{"id": k["name"], "object": "model", "created": 0, "owned_by": "kb"}
                                       for k in svc.kbs() if g.can_read(k["name"])]}


@router.post("/v1/chat/completions", responses=CHAT_RESPONSES)
def chat(body: ChatRequest, caller: Caller, svc: Svc):
    """OpenAI-compatible chat completion answered from the knowledge base named by `model`.

    The response carries the chain's sources, `fallback` and `reason` under the extra key `kb`.
    Streaming follows `answer.stream_mode`; in `live` mode a reply that fails the final
    compliance check after it was streamed ends with a chunk whose `finish_reason` is
    `content_filter`, whose delta is the fallback reply (after a blank line) and whose `kb` has
    `replace: true` and `answer`: clients that read it show `answer` instead of the message.
    """
    caller.readable(body.model)
    question, history = split_chat(body.messages)
    chain = svc.chain(body.model)
    completion = Completion(body.model)
    if not body.stream:
        return completion.reply(chain.ask(question, history, body.stage).to_json())
    return event_stream(chat_events(chain, completion, question, history, body.stage))


def chat_events(chain: AnswerChain, completion: Completion, question: str, history: list[list[str]],
                stage: str | None) -> Iterator[str]:
    """The streamed completion as chunks, then `[DONE]`; a failure after the status line is reported in-band."""
    yield completion.chunk({"role": "assistant", "content": ""})
    try:
        for piece in chain.stream(question, history, stage):
            if not isinstance(piece, dict):
                yield completion.chunk({"content": piece})
            elif piece["replace"]:  # live mode: what was sent failed the final check
                extra = {**extension(piece), "replace": True, "answer": piece["answer"]}
                yield completion.chunk({"content": "\n\n" + piece["answer"]}, "content_filter", kb=extra)
            else:
                yield completion.chunk({}, "stop", kb=extension(piece))
    except Exception:  # noqa: BLE001 - the status line is gone; report in-band
        log.exception("stream failed")
        yield sse(internal_error_body())
    yield "data: [DONE]\n\n"
