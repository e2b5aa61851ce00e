"""Training-data formats (JSONL), read and written.

SFT conversations: `{"messages": [{"role", "content"}, ...]}`, `{"prompt", "response", "history"?:
[[q, a], ...], "system"?}` or alpaca `{"instruction", "input"?, "output"}`; all read into
message lists. Embedding pairs: `{"query", "pos": [...], "neg": [...]}`.
"""

from __future__ import annotations

from pathlib import Path

from kb.jsonl import by_line, read_jsonl, write_jsonl  # noqa: F401  (write_jsonl: part of this module's API)

Messages = list[dict[str, str]]
ROLES = {"system", "user", "assistant"}
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The ChatML chat template (Qwen's turn format) for tokenizers built without one."""


def to_messages(row: dict) -> Messages:
    """One row of any supported SFT format as a message list; ValueError says what is wrong."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError('each message needs "role" (system/user/assistant) and "content"')
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in row and "response" in row:
        msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        for turn in row.get("history") or []:
            if not (isinstance(turn, list | tuple) and len(turn) == 2):
                raise ValueError('"history" must be a list of [question, answer] pairs')
            msgs += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
        return msgs + [{"role": "user", "content": str(row["prompt"])},
                       {"role": "assistant", "content": str(row["response"])}]
    if "instruction" in row and "output" in row:
        prompt = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
    raise ValueError('expected "messages", "prompt"+"response" or "instruction"+"output"')


def to_prompt_response(msgs: Messages) -> dict:
    """A message list as `{"prompt", "response", "history", "system"?}` (ends with the assistant)."""
    system = [m["content"] for m in msgs if m["role"] == "system"]
    turns = [m for m in msgs if m["role"] != "system"]
    pairs = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    row = {"prompt": pairs[-1][0], "response": pairs[-1][1], "history": pairs[:-1]}
    if system:
        row["system"] = system[0]
    return row


def load_conversations(path: str | Path) -> tuple[list[Messages], list[str]]:
    """The SFT rows of a JSONL file as message lists, and the problems of the rows skipped."""
    rows, problems = read_jsonl(path)
    out = []
    for n, row in rows:
        try:
            out.append(to_messages(row))
        except ValueError as e:
            problems.append(f"{Path(path).name}:{n}: skipped ({e})")
    return out, by_line(problems)


def load_pairs(path: str | Path) -> tuple[list[dict], list[str]]:
    """Embedding examples `{"query", "pos": [..], "neg": [..]}` (pos/neg may be strings)."""
    rows, problems = read_jsonl(path)
    out = []
    for n, row in rows:
        pos = row.get("pos")
        pos = [pos] if isinstance(pos, str) else pos
        neg = row.get("neg") or []
        neg = [neg] if isinstance(neg, str) else neg
        if not str(row.get("query", "")).strip() or not pos or not all(isinstance(p, str) for p in [*pos, *neg]):
            problems.append(f"{Path(path).name}:{n}: skipped (needs \"query\" and \"pos\")")
            continue
        out.append({"query": str(row["query"]), "pos": list(pos), "neg": list(neg)})
    return out, by_line(problems)
