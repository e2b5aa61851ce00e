"""The request and response bodies of the HTTP API, with their limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from kb.paths import KB_NAME_PATTERN
from retrieval.knowledge_base import MAX_CHUNK_TEXT, MAX_USER
from serve.routes.common import ApiError

MAX_TEXT = 4000
"""The longest question, and each question and answer of `history`."""
MAX_MESSAGE = 16000
"""The longest chat message text (a string, or each text part)."""
MAX_PARTS = 50
"""The most content parts of one chat message."""

KBName = Annotated[str, Field(min_length=1, max_length=64, pattern=KB_NAME_PATTERN)]
Turn = Annotated[str, Field(max_length=MAX_TEXT)]


class AskRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"kb": "policies", "question": "How long does a refund take?"}]})
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
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"text": "Refunds reach the card within five working days."}]})
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
