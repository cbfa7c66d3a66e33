"""Token log-probs through the LM head in chunks, with no ``[tokens, vocab]`` tensor kept for backward.

``log_softmax(hidden @ W.T + b)[target]`` for ``M`` response positions needs ``M x vocab`` float32
logits; autograd keeps them (or the log-softmax output) alive until backward, so the loss's peak
memory grows with vocabulary x response tokens (151,936 x 4,096 tokens = 2.3 GiB for Qwen). The
:class:`ChunkedTokenLogps` autograd function computes the logits ``chunk_size`` rows at a time with
a float32 log-softmax per chunk, keeps only the ``[M]`` results and its inputs, and recomputes each
chunk's logits in backward to form ``d logits = g * (onehot - softmax)`` and from it the gradients of
the hidden states, the weight and the bias, one chunk at a time (the recomputation idea of Liger
Kernel's fused linear cross-entropy, arXiv 2410.10989). Peak memory: ``chunk_size x vocab``.

:func:`head_token_logps` picks this path for a plain ``nn.Linear`` head without hooks, and otherwise
calls the head module chunk by chunk (LoRA on the head, DeepSpeed ZeRO-3 / FSDP parameter hooks,
user hooks keep working; then the logits are kept for backward as usual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChunkedTokenLogps", "can_fuse_head", "chunked_token_logps", "head_token_logps"]


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, cap: float | None) -> tuple[Tensor, Tensor | None]:
    """float32 logits of a chunk (soft-capped if ``cap``) and the ``tanh`` needed by the cap's derivative."""
    logits = F.linear(h, weight, bias).float()
    if cap:
        t = torch.tanh(logits / cap)
        return t * cap, t
    return logits, None


class ChunkedTokenLogps(torch.autograd.Function):
    """``[M]`` float32 log-probs of ``targets`` under ``log_softmax(hidden @ weight.T + bias)``, chunked.

    Forward: ``hidden [M, H]``, ``weight [V, H]``, ``bias [V]`` or ``None``, ``targets [M]`` (long),
    ``chunk_size``, ``cap`` (final-logit soft-cap or ``None``). Saved for backward: the inputs only.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int, cap: float | None) -> Tensor:  # noqa: D102
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            logits, _ = _chunk_logits(hidden[s : s + chunk_size], weight, bias, cap)
            tgt = targets[s : s + chunk_size, None]
            out[s : s + chunk_size] = (logits.gather(1, tgt) - torch.logsumexp(logits, dim=-1, keepdim=True))[:, 0]
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.cap = chunk_size, cap
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        # float32 accumulators over chunks (bf16 weights would lose the small per-chunk terms)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[s : s + ctx.chunk_size]
            logits, t = _chunk_logits(h, weight, bias, ctx.cap)
            g = grad_out[s : s + ctx.chunk_size, None]
            # d/d logits of g * (logits[target] - logsumexp(logits)) = g * (onehot - softmax)
            d = torch.softmax(logits, dim=-1).mul_(-g)
            del logits
            d.scatter_add_(1, targets[s : s + ctx.chunk_size, None], g)
            if t is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
                d.mul_(1 - t * t)
            if need_h:
                grad_h[s : s + ctx.chunk_size] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(d.t(), h.float())
            if need_b:
                grad_b += d.sum(0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def chunked_token_logps(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int = 1024, cap: float | None = None
) -> Tensor:
    """``[M]`` float32 target log-probs through a linear head, chunked in forward and backward (see module doc)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size, cap)


def can_fuse_head(head: nn.Module) -> bool:
    """Whether ``head`` is a plain ``nn.Linear`` whose weights can be used directly (no hooks, no sharding)."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    weight = head.weight
    # ZeRO-3 partitions parameters (ds_id, empty local data); DTensor / FSDP flat params are not plain tensors
    return type(weight) in (nn.Parameter, Tensor) and not hasattr(weight, "ds_id") and weight.dim() == 2 and weight.numel() > 0


def head_token_logps(head: nn.Module, states: Tensor, targets: Tensor, chunk_size: int = 1024, cap: float | None = None) -> Tensor:
    """``[M]`` float32 log-probs of ``targets`` given the decoder states ``[M, H]`` at the predicting positions.

    A plain linear head goes through :class:`ChunkedTokenLogps` (no ``[M, vocab]`` tensor kept for
    backward); any other head is called chunk by chunk as a module.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if can_fuse_head(head):
        return chunked_token_logps(states, head.weight, head.bias, targets, chunk_size, cap)
    parts = []
    for s in range(0, targets.numel(), chunk_size):
        chunk = head(states[s : s + chunk_size]).float()
        if cap:
            chunk = torch.tanh(chunk / cap) * cap
        parts.append(-F.cross_entropy(chunk, targets[s : s + chunk_size], reduction="none"))
    return torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)
