"""A fused training forward for Llama-style decoder layers (Qwen2, Llama, Mistral) with LoRA.

transformers runs a decoder layer as a tree of modules (peft's LoRA wrappers, norms, attention
through a dispatch table); compiled per layer it still breaks into several graphs, and its
activation checkpointing re-runs the whole layer in the backward pass. Here one plain function of
tensors computes the same layer (RMSNorm in fp32, rotary embedding, SDPA attention, SwiGLU, LoRA
on every adapted linear layer) and is compiled as one graph; with checkpointing, the checkpoint
sits inside that graph, so the compiler's partitioner recomputes only what the backward pass reads
(not the down projection, whose output nothing reads). The module tree, its parameters and what
gets saved are unchanged: only each layer's `forward` is replaced.
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)
LAYERS = {"Qwen2DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer"}
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def linear_parts(module) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
    """(weight, bias, (A, B, scale) or None) of a plain or peft-LoRA linear layer; ValueError when
    the adapter is one this forward does not compute (dropout, DoRA, several or merged adapters)."""
    if isinstance(module, torch.nn.Linear) and not hasattr(module, "base_layer"):
        return module.weight, module.bias, None
    base = getattr(module, "base_layer", None)
    if not isinstance(base, torch.nn.Linear):
        raise ValueError(f"{type(module).__name__} is not a linear or LoRA linear layer")
    active = [a for a in getattr(module, "active_adapters", []) if a in module.lora_A]
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False) or len(active) > 1:
        raise ValueError("merged, disabled or several active adapters")
    if not base.weight.is_floating_point() or type(base).__name__ != "Linear":
        raise ValueError("quantised base weights")
    if not active:
        return base.weight, base.bias, None
    name = active[0]
    if module.use_dora.get(name, False):
        raise ValueError("DoRA")
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        raise ValueError("LoRA dropout > 0")
    return base.weight, base.bias, (module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))


def unsupported(layer) -> str | None:
    """Why `layer` cannot take the fused forward, or None."""
    if type(layer).__name__ not in LAYERS:
        return f"{type(layer).__name__} is not a Llama-style decoder layer"
    attn, cfg = layer.self_attn, layer.self_attn.config
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(attn, "sliding_window", None):
        return "activation other than SiLU or sliding-window attention"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        # flash-attention kernels take packed rows as position ids with no mask: causal over the
        # whole row here would let packed examples see each other
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} (the fused forward is SDPA's)"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout > 0"
    try:
        for part, name in LINEARS:
            linear_parts(getattr(getattr(layer, part), name))
    except (ValueError, AttributeError) as e:
        return str(e)
    return None


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _linear(x: torch.Tensor, parts: tuple) -> torch.Tensor:
    """x W^T + b, plus the LoRA term scale * (x A^T) B^T accumulated into the same output by the
    second GEMM (addmm): no separate full-width LoRA output and sum, which in a 7B backward held
    four more MLP-sized buffers at the peak (`bench/finetune.py --mem-probe`)."""
    w, b, lora = parts
    y = F.linear(x, w, b)
    if lora is None:
        return y
    a, bb, scale = lora
    xa = F.linear(x, a.to(x.dtype))
    return torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), bb.to(x.dtype).t(),
                       alpha=scale).view(y.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def layer_math(x, cos, sin, mask, norms, linears, dims) -> torch.Tensor:
    """One decoder layer: x [B, T, d] -> [B, T, d]. `linears` are (weight, bias, lora) for q, k, v,
    o, gate, up, down; `dims` (heads, kv heads, head dim, attention scale, eps)."""
    heads, kv_heads, head_dim, scale, eps = dims
    q_p, k_p, v_p, o_p, gate_p, up_p, down_p = linears
    bsz, t, _ = x.shape
    h = _rms(x, norms[0], eps)
    q = _linear(h, q_p).view(bsz, t, heads, head_dim).transpose(1, 2)
    k = _linear(h, k_p).view(bsz, t, kv_heads, head_dim).transpose(1, 2)
    v = _linear(h, v_p).view(bsz, t, kv_heads, head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if mask is None:
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
    else:
        if heads != kv_heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    x = x + _linear(a.transpose(1, 2).reshape(bsz, t, heads * head_dim), o_p)
    h = _rms(x, norms[1], eps)
    return x + _linear(F.silu(_linear(h, gate_p)) * _linear(h, up_p), down_p)


def layer_step(x, cos, sin, mask, norms, linears, dims, recompute: bool) -> torch.Tensor:
    """`layer_math`, with activation checkpointing inside the (compiled) graph when `recompute`:
    the partitioner then recomputes only what the backward pass reads (measured on a 7B shape:
    1.10x the same forward checkpointed outside the compiled graph, 12.3k against 11.2k
    tokens/s, at the same peak memory)."""
    if recompute:
        return checkpoint(layer_math, x, cos, sin, mask, norms, linears, dims, use_reentrant=False)
    return layer_math(x, cos, sin, mask, norms, linears, dims)


COMPILE_BACKEND = "inductor"
"""torch.compile's backend for the layer function (tests use "eager": same graph capture, no codegen)."""
GRAPHS_MODE = "reduce-overhead"
"""torch.compile's mode for `graphs`: inductor's CUDA graph trees record each layer's forward and
backward kernels once and replay them (the layers' weights are parameters, which dynamo marks as
static inputs: nothing is copied but the activations)."""
_COMPILED: dict[tuple, object] = {}


def compile_options(graphs: bool) -> dict:
    """torch.compile's keyword arguments for the layer function: the backend, and with `graphs`
    the CUDA-graph mode (a mode is an inductor option: another backend takes none)."""
    if graphs and COMPILE_BACKEND == "inductor":
        return {"mode": GRAPHS_MODE}
    return {"backend": COMPILE_BACKEND}


def _step_fn(compiled: bool, graphs: bool = False):
    """The layer function, compiled once per backend and mode: shapes that change (a last, smaller
    batch, padded widths) make dynamo mark their dimensions dynamic instead of compiling per shape."""
    if not compiled:
        return layer_step
    key = (COMPILE_BACKEND, graphs)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(layer_step, fullgraph=True, dynamic=None, **compile_options(graphs))
    return _COMPILED[key]


def keep_grads(model) -> int:
    """Make every trainable parameter of `model` take a copy of its incoming gradient: a gradient
    that a CUDA graph's backward returns lives in the graph trees' memory pool, and `.grad` would
    keep that very tensor, which the next micro-batch's replay overwrites (gradient accumulation:
    pytorch/pytorch#169545). The number of parameters hooked."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.register_hook(torch.Tensor.clone)
    return len(params)


def _unfused(self, hidden_states, **kwargs):
    """The transformers forward, checkpointed as transformers would have when the fused one recomputes."""
    if self._fused_recompute and self.training and torch.is_grad_enabled():
        return checkpoint(self._unfused_forward, hidden_states, use_reentrant=False, **kwargs)
    return self._unfused_forward(hidden_states, **kwargs)


def fused_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                  position_embeddings=None, **kwargs):
    """The replacement `forward` of a decoder layer in training (inference, caches and masks other
    than boolean ones take the original)."""
    if not self.training or cache is not None or kwargs.get("past_key_values") is not None \
            or position_embeddings is None or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return _unfused(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    self._fused_calls += 1
    attn = self.self_attn
    linears = tuple(linear_parts(getattr(getattr(self, part), name)) for part, name in LINEARS)
    norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
    cfg = attn.config
    dims = (cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, attn.scaling,
            self.input_layernorm.variance_epsilon)
    cos, sin = position_embeddings
    step = _step_fn(self._fused_compile, self._fused_graphs)
    return step(hidden_states, cos.to(hidden_states.dtype), sin.to(hidden_states.dtype), attention_mask, norms, linears,
                dims, self._fused_recompute)


def decoder_layers(model) -> list:
    """The decoder layers of `model` (a peft model's base model's), or none."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(inner.get_decoder(), "layers", []))


def install(model, *, recompute: bool, compile: bool, graphs: bool = False) -> int:
    """Give every supported decoder layer of `model` the fused forward; the number installed (0
    when any layer is unsupported: then the model trains as before, and the reason is logged).
    `graphs` (with `compile`): the compiled layers replay as CUDA graphs (`GRAPHS_MODE`)."""
    layers = decoder_layers(model)
    reasons = {r for r in (unsupported(layer) for layer in layers) if r}
    if not layers or reasons:
        log.info("fused decoder layers off: %s", "; ".join(sorted(reasons)) or "no decoder layers")
        return 0
    for layer in layers:
        if not hasattr(layer, "_unfused_forward"):
            layer._unfused_forward = layer.forward
        layer.forward = MethodType(fused_forward, layer)
        layer._fused_recompute, layer._fused_compile, layer._fused_calls = recompute, compile, 0
        layer._fused_graphs = compile and graphs
    return len(layers)


def calls(model) -> int:
    """How many times the fused forward ran (over all layers) since `install`."""
    return sum(getattr(layer, "_fused_calls", 0) for layer in decoder_layers(model))
