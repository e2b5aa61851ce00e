"""LLM backends behind one interface: a local transformers model, an OpenAI-compatible endpoint,
or none (the chain then answers extractively)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Protocol

from kb.models import pick_device, resolve_model
from kb.settings import Settings

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]


def render_chat(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The conversation as the model sees it: its chat template, or plain "role: text" turns."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + "\n\nassistant:" if add_generation_prompt else text


class LLM(Protocol):
    name: str

    def generate(self, messages: Messages) -> str: ...

    def stream(self, messages: Messages) -> Iterator[str]: ...


class LocalLLM:
    """A causal LM from a local folder or package (models.llm), with an optional LoRA adapter."""

    def __init__(self, spec: str, settings: Settings) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(spec, "llm")
        device = pick_device(settings.models.device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        if settings.llm.adapter:
            try:
                from peft import PeftModel
            except ImportError as e:  # pragma: no cover - depends on the install
                raise RuntimeError("llm.adapter is set but peft is not installed (pip install peft)") from e
            model = PeftModel.from_pretrained(model, settings.llm.adapter).eval()
        self._setup(model, tokenizer, settings, f"local:{spec}")

    @classmethod
    def from_model(cls, model, tokenizer, settings: Settings, name: str = "local") -> LocalLLM:
        """Wrap an already loaded model (benchmarks, notebooks)."""
        self = cls.__new__(cls)
        self._setup(model.eval(), tokenizer, settings, name)
        return self

    def _setup(self, model, tokenizer, settings: Settings, name: str) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.device = str(next(model.parameters()).device)
        self.gen = settings.llm.generation
        self.static_cache = settings.llm.static_cache
        self._lock = threading.Lock()  # one generation at a time per model

    def _inputs(self, messages: Messages):
        tok = self.tokenizer
        text = render_chat(tok, messages)
        enc = tok(text, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False)
        return enc.to(self.device)

    def _kwargs(self, threaded: bool = False) -> dict:
        g = self.gen
        kw = {"max_new_tokens": g.max_new_tokens, "repetition_penalty": g.repetition_penalty,
              "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        # fixed-shape KV cache: transformers compiles the decoding step with CUDA graphs, which must
        # run on the thread that captured them, so streaming (a generation thread) keeps the dynamic cache
        if self.static_cache and not threaded:
            kw["cache_implementation"] = "static"
        if g.temperature > 0:
            kw.update(do_sample=True, temperature=g.temperature, top_p=g.top_p)
        else:
            kw.update(do_sample=False)
        return kw

    def generate(self, messages: Messages) -> str:
        import torch

        inputs = self._inputs(messages)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs, **self._kwargs())
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def stream(self, messages: Messages, streamer=None) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        inputs = self._inputs(messages)
        streamer = streamer or TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run() -> None:
            import torch

            with self._lock, torch.inference_mode():
                self.model.generate(**inputs, **self._kwargs(threaded=True), streamer=streamer)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        yield from streamer
        t.join()


class OpenAICompatibleLLM:
    """Any OpenAI-compatible chat endpoint (vLLM, TGI, ...)."""

    def __init__(self, settings: Settings) -> None:
        import httpx

        c = settings.llm
        self.url = c.openai_base_url.rstrip("/") + "/chat/completions"
        self.model = c.openai_model
        key = os.environ.get(c.openai_api_key_env, "")
        self.client = httpx.Client(timeout=c.timeout_s, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.gen = c.generation
        self.name = f"openai:{self.model}@{c.openai_base_url}"

    def _body(self, messages: Messages, stream: bool) -> dict:
        g = self.gen
        return {"model": self.model, "messages": messages, "max_tokens": g.max_new_tokens,
                "temperature": g.temperature, "top_p": g.top_p, "stream": stream}

    def generate(self, messages: Messages) -> str:
        r = self.client.post(self.url, json=self._body(messages, False))
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"].strip()

    def stream(self, messages: Messages) -> Iterator[str]:
        with self.client.stream("POST", self.url, json=self._body(messages, True)) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
                if delta:
                    yield delta


_CACHE: dict[tuple, LLM | None] = {}
_CACHE_LOCK = threading.Lock()


def build_llm(settings: Settings) -> LLM | None:
    """The configured backend, or None for extractive answers. Loaded once per process."""
    c = settings.llm
    backend = c.backend
    if backend == "auto":
        backend = "local" if settings.models.llm else ("openai" if c.openai_base_url else "extractive")
    key = (backend, settings.models.llm, c.adapter, c.openai_base_url, c.openai_model)
    with _CACHE_LOCK:
        if key not in _CACHE:
            if backend == "local":
                _CACHE[key] = LocalLLM(settings.models.llm or "", settings)
            elif backend == "openai":
                if not c.openai_base_url:
                    raise ValueError("llm.backend is openai but llm.openai_base_url is not set")
                _CACHE[key] = OpenAICompatibleLLM(settings)
            else:
                _CACHE[key] = None
        return _CACHE[key]
