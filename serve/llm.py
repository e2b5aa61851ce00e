"""LLM backends behind one interface: a local transformers model, an OpenAI-compatible endpoint,
or none (the chain then answers extractively)."""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from kb.models import ModelNotFoundError, cpu_has_bf16, is_installed, pick_device, resolve_model
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


def resolve_dtype(setting: str, device: str):
    """The torch dtype for `llm.dtype` on `device` (auto: bf16 on a GPU that has it, else fp16;
    on a CPU bf16 where it computes bf16 natively, else fp32)."""
    import torch

    if setting != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setting]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def adapter_path(spec: str | None, base: Path) -> Path | None:
    """The folder of adapter `spec` for base model `base`, or None. A `model:` adapter that is not
    installed, or was made for another base model, is skipped with a warning; a missing folder
    that was configured explicitly is an error."""
    if not spec:
        return None
    if not spec.startswith("model:"):
        return resolve_model(spec, "adapter")
    try:
        path = resolve_model(spec, "adapter")
    except ModelNotFoundError as e:
        log.warning("llm.adapter skipped, answering with the base model: %s", e)
        return None
    cfg = path / "adapter_config.json"
    made_for = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") if cfg.is_file() else None
    if made_for and Path(made_for).is_dir() and Path(made_for).resolve() != base.resolve():
        log.warning("llm.adapter %s skipped: it was made for %s, models.llm is %s", spec, made_for, base)
        return None
    return path


def apply_adapter(model, path: Path):
    """`model` with the adapter at `path`: a LoRA is merged into the weights (no extra matmuls per
    token); other kinds (P-Tuning v2) stay wrapped."""
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("llm.adapter is set but peft is not installed (pip install peft)") from e
    dtype = next(model.parameters()).dtype
    wrapped = PeftModel.from_pretrained(model, str(path)).eval()
    if wrapped.peft_config[wrapped.active_adapter].peft_type.value == "LORA":
        return wrapped.merge_and_unload().to(dtype).eval()
    return wrapped.to(dtype)


def cast_linear(linear, dtype):
    """A module running `linear` in `dtype` inside an fp32 model (input cast in, output cast back)."""
    import torch

    class CastLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear.to(dtype)

        def forward(self, x):
            return self.linear(x.to(self.linear.weight.dtype)).to(x.dtype)

    return CastLinear()


def quantize_int8(model, keep: tuple[str, ...] = ("down_proj",), keep_dtype=None):
    """`model` in fp32 with its Linear layers dynamically quantized to int8 (per output channel),
    except those named in `keep`, which run in `keep_dtype` (default fp32): the MLP's down
    projection reads outlier activations that int8 cannot hold (bench/results/answer_latency_cpu.json,
    `weight_quality`)."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.float()
    names = set()
    for name, m in list(model.named_modules()):
        if not isinstance(m, torch.nn.Linear):  # a snapshot: the wrappers made below are not visited
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf not in keep:
            names.add(name)
        elif keep_dtype is not None and keep_dtype != torch.float32:
            setattr(model.get_submodule(parent) if parent else model, leaf, cast_linear(m, keep_dtype))
    with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated; they still work
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8).eval()


class LocalLLM:
    """A causal LM from a local folder or package (models.llm), with an optional LoRA adapter."""

    def __init__(self, spec: str, settings: Settings) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        c = settings.llm
        if c.threads > 0:
            torch.set_num_threads(c.threads)
        path = resolve_model(spec, "llm")
        device = pick_device(settings.models.device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        int8 = c.quantize == "int8" and device == "cpu"
        if c.quantize == "int8" and not int8:
            log.warning("llm.quantize int8 is for the CPU; on %s the model runs unquantized", device)
        want = resolve_dtype(c.dtype, device)
        dtype = torch.float32 if int8 else want
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        adapter = adapter_path(c.adapter, path)
        if adapter is not None:
            model = apply_adapter(model, adapter)
        if int8:
            model = quantize_int8(model, keep_dtype=want)
        self.adapter = adapter
        self._setup(model, tokenizer, settings, f"local:{spec}" + (f"+{c.adapter}" if adapter else "")
                    + ("+int8" if int8 else ""))

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
        self.prefix_cache = settings.llm.prefix_cache
        self._prefixes: dict[str, tuple] = {}  # system-prompt text -> (its token ids, its KV cache)
        self._lock = threading.Lock()  # one generation at a time per model

    def inputs(self, messages: Messages):
        """The chat-templated prompt of `messages`, tokenized, on the model's device."""
        tok = self.tokenizer
        text = render_chat(tok, messages)
        enc = tok(text, return_tensors="pt", add_special_tokens=False, return_token_type_ids=False)
        return enc.to(self.device)

    def _cached_prefix(self, messages: Messages, input_ids):
        """A copy of the KV cache of the conversation's system message (computed once per system
        prompt), or None when there is none or it is not a token prefix of `input_ids`."""
        import torch
        from transformers import DynamicCache

        if not (self.prefix_cache and messages and messages[0]["role"] == "system"):
            return None
        text = render_chat(self.tokenizer, messages[:1], add_generation_prompt=False)
        if text not in self._prefixes:
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            if len(self._prefixes) >= 16:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[text] = (ids[0], cache)
        ids, cache = self._prefixes[text]
        n = ids.shape[0]
        if input_ids.shape[1] <= n or not torch.equal(input_ids[0, :n], ids):
            return None
        return copy.deepcopy(cache)

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

    def _generate(self, messages: Messages, threaded: bool = False, **extra):
        """model.generate on the rendered conversation (under the lock), reusing the cached
        system-prompt prefix; returns (prompt length, output ids)."""
        import torch

        inputs = self.inputs(messages)
        kw = {**self._kwargs(threaded), **extra}
        with self._lock, torch.inference_mode():
            if "cache_implementation" not in kw:
                cache = self._cached_prefix(messages, inputs["input_ids"])
                if cache is not None:
                    kw["past_key_values"] = cache
            out = self.model.generate(**inputs, **kw)
        return inputs["input_ids"].shape[1], out

    def generate(self, messages: Messages) -> str:
        n, out = self._generate(messages)
        return self.tokenizer.decode(out[0, n:], skip_special_tokens=True).strip()

    def stream(self, messages: Messages, streamer=None) -> Iterator[str]:
        """Text pieces as the model generates them (in a thread). Closing the iterator early
        stops the generation at the next token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        streamer = streamer or TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop, failed = threading.Event(), []

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            try:
                self._generate(messages, threaded=True, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Stop()]))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                failed.append(e)
                streamer.end()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            yield from streamer
        finally:
            stop.set()
            t.join()
        if failed:
            raise failed[0]


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
_WARNED: set[str] = set()


def pick_backend(settings: Settings) -> str:
    """`llm.backend`, with auto resolved: openai when llm.openai_base_url is set, else local when
    models.llm is set (a `model:` spec only when it is installed: a minimal install answers
    extractively, with a warning), else extractive."""
    c, spec = settings.llm, settings.models.llm
    if c.backend != "auto":
        return c.backend
    if c.openai_base_url:
        return "openai"
    if not spec:
        return "extractive"
    if spec.startswith("model:") and not is_installed(spec):
        if spec in _WARNED:
            return "extractive"
        _WARNED.add(spec)
        name = spec[6:]
        log.warning("models.llm %s is not installed: answers are extractive (run `kb models install %s`, "
                    "or set llm.backend: extractive to silence this)", spec, name)
        return "extractive"
    return "local"


def build_llm(settings: Settings) -> LLM | None:
    """The configured backend, or None for extractive answers. Loaded once per process."""
    c = settings.llm
    backend = pick_backend(settings)
    # every llm.* setting (generation, threads, ...) and where `model:` specs resolve: two configs
    # that differ in any of them never share a loaded model
    key = (backend, settings.models.llm, settings.models.device, str(settings.models_dir()), c.model_dump_json())
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
