"""The fused LM head + cross-entropy of SFT: the loss over the labelled positions only, computed
in chunks of rows so the full [tokens x vocab] logits are never held (a Liger-style kernel in
plain torch), and the model's last hidden state without every layer's."""

from __future__ import annotations

import contextlib

import torch

IGNORE = -100
"""The label of a position that takes no loss (prompt, history, padding)."""


def label_positions(labels: torch.Tensor) -> dict:
    """Where the loss is taken, found on the CPU while collating (no device sync in the step):
    `label_index` of each position whose next token is labelled, in the flattened [B, T - 1]
    shifted view, and `label_targets`, those next tokens."""
    shift = labels[:, 1:]
    index = (shift != IGNORE).flatten().nonzero().squeeze(1)
    return {"label_index": index, "label_targets": shift.flatten()[index]}


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of -log p(target) for hidden states h [N, d] under the head W [V, d], in chunks of
    rows; the gradients are computed in the forward pass, so no [N, V] logits are kept."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int = 4096):
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, -1)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            logits.sub_(lse[:, None]).exp_()  # softmax, in place
            logits[torch.arange(len(tc), device=tc.device), tc] -= 1.0
            g = logits.to(h.dtype)
            grad_h[s : s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w = grad_w is not None
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.has_w else None
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None


def ce_chunk_rows(vocab: int, budget_bytes: int = 1 << 27) -> int:
    """Rows per chunk of the fused loss: a power of two whose fp32 logits fit `budget_bytes`."""
    rows = max(64, budget_bytes // (4 * vocab))
    return 1 << (rows.bit_length() - 1)


def fused_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
                 targets: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed loss, labelled positions) for next-token prediction over [B, T, d] hidden states;
    `index`/`targets` from `label_positions` spare the device sync of finding them here."""
    if index is None or targets is None:
        found = label_positions(labels)
        index, targets = found["label_index"].to(hidden.device), found["label_targets"].to(hidden.device)
    n = len(index)
    if n == 0:
        return hidden.sum() * 0.0, 0
    d = hidden.shape[-1]
    # accelerate returns the forward's outputs in fp32 under mixed precision: back to the head's dtype
    h = hidden[:, :-1].reshape(-1, d).index_select(0, index).to(weight.dtype)
    return FusedLinearCrossEntropy.apply(h, weight, targets, ce_chunk_rows(weight.shape[0])), n


def gathered(weight: torch.nn.Parameter):
    """A context in which `weight` is whole: under ZeRO-3 a parameter is partitioned (an empty
    tensor) outside its module's forward, so a frozen head read by the fused loss is gathered for
    it (read-only: `modifier_rank=None`, each rank drops its copy on exit); nothing otherwise, nor
    when ZeRO-3 holds it whole already (a head tied to the embeddings, kept for reuse: dropping it
    here would make the backward gather it again). A trainable head is refused: its gradient,
    computed here, would bypass ZeRO-3's reduce-scatter."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    if weight.requires_grad:
        raise ValueError("the fused loss under ZeRO-3 needs a frozen LM head (LoRA); set fused_ce off")
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


def forward_final_hidden(model, inner, inputs: dict):
    """(outputs, last hidden state) of `model` (maybe wrapped) on `inputs`, keeping one position's
    logits. The last hidden state is the final norm's output, which the head reads: taken by a
    hook on that norm where there is one, because `output_hidden_states` returns every layer's
    and accelerate casts all of them to fp32 under mixed precision (1.6 GiB on a 7B batch)."""
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, torch.nn.Module) or isinstance(model, torch.nn.DataParallel):
        # DataParallel replicas would each call the hook with their shard
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        return out, out.hidden_states[-1]
    seen: dict = {}
    handle = norm.register_forward_hook(lambda mod, args, output: seen.__setitem__("h", output))
    try:
        out = model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return out, seen["h"]


