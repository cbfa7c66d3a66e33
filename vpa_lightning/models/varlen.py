"""Packed shared-prefix groups as variable-length attention: no mask, no padding, no compiler.

The method of flash-preference and of "Prefix sharing for preference tuning" (arXiv 2410.20305) on
variable-length flash attention. The packed tokens are one row with every group's segment
``[prefix | response 1 | ... | response K]``; attention runs over *sequences* with separate query and key
offsets (``cu_seq_q``, ``cu_seq_k``):

* a group's prefix is one sequence: its queries attend causally to the prefix;
* response j of the group is one sequence whose queries are the response's tokens and whose keys are the
  prefix's tokens followed by the response's (gathered, so the prefix keys/values appear once per
  response), causal aligned to the bottom right: the response's token i sees the whole prefix and its own
  tokens up to i.

So every response sees its prefix and itself only, exactly what the segment mask of
:mod:`~vpa_lightning.models.packed` allows, with no ``[L, L]`` mask, no padding between segments, and nothing
compiled or planned per shape (the cause of the irregular multi-second steps the SDPA/cuDNN mask path showed on
the H200, see the README). On CUDA the kernel is PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (flash
attention, bf16/fp16); elsewhere a reference that runs plain SDPA per sequence (tests, and a CPU run that asks
for ``packed_attention="varlen"``).

The attention function is registered with transformers as ``vpa_varlen`` (:func:`register`) and set on the
model's text decoder; each packed forward passes its :class:`VarlenLayout` as the ``vpa_varlen`` keyword, which
transformers hands to every attention call (and gradient checkpointing's recomputation keeps). A call without
a layout (the plain path, generation, the vision tower) runs transformers' own SDPA, with SDPA's masks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NAME", "VarlenLayout", "flash_varlen_available", "register", "varlen_attention", "varlen_layout"]

#: The attention implementation name the text decoder gets (delegates to SDPA without a layout).
NAME = "vpa_varlen"


@dataclass
class VarlenLayout:
    """Query/key sequences of packed shared-prefix segments over one row of ``total`` tokens.

    Attributes:
        cu_q: ``[S + 1]`` int32 offsets of the query sequences in the row (prefix, then each response).
        cu_k: ``[S + 1]`` int32 offsets of the key sequences in the gathered keys.
        key_index: ``[Tk]`` the row position of every gathered key (prefix positions repeated per response).
        max_q: Longest query sequence.
        max_k: Longest key sequence.
        total: Tokens in the row (queries).
    """

    cu_q: Tensor
    cu_k: Tensor
    key_index: Tensor
    max_q: int
    max_k: int
    total: int


def varlen_layout(prefix: list[int], responses: list[list[int]], device: torch.device | str = "cpu") -> VarlenLayout:
    """The layout of groups laid out one after the other, each as ``[prefix | response 1 | ... | response K]``
    with ``prefix[g]`` prefix tokens and response lengths ``responses[g]`` (built on the host, one copy)."""
    q_lens: list[int] = []
    k_lens: list[int] = []
    pieces: list[Tensor] = []
    start = 0
    for p, lengths in zip(prefix, responses):
        pre = torch.arange(start, start + p)
        q_lens.append(p)
        k_lens.append(p)
        pieces.append(pre)
        col = start + p
        for n in lengths:
            q_lens.append(n)
            k_lens.append(p + n)
            pieces += [pre, torch.arange(col, col + n)]
            col += n
        start = col
    cu = torch.zeros(2, len(q_lens) + 1, dtype=torch.long)
    cu[0, 1:] = torch.tensor(q_lens, dtype=torch.long).cumsum(0)
    cu[1, 1:] = torch.tensor(k_lens, dtype=torch.long).cumsum(0)
    key_index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    both = torch.cat([cu.flatten(), key_index]).to(device)  # one host-to-device copy
    n = cu.shape[1]
    return VarlenLayout(cu_q=both[:n].int(), cu_k=both[n : 2 * n].int(), key_index=both[2 * n :],
                        max_q=max(q_lens, default=0), max_k=max(k_lens, default=0), total=start)


@lru_cache(maxsize=1)
def _flash() -> tuple[Any, dict[str, Any], bool] | None:
    """``(varlen_attn, its causal keyword, whether it takes enable_gqa)`` or ``None`` where torch lacks it.
    torch <= 2.10 spelled causality ``is_causal=True``; 2.11 has ``window_size=(-1, 0)`` (bottom-right aligned
    when queries are fewer than keys: checked on an H200, ``benchmarks/varlen_probe.py``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


def _kernel(q: Tensor) -> tuple[Any, dict[str, Any], bool] | None:
    """The flash kernel for ``q``'s device (``None``: the reference)."""
    return _flash() if q.is_cuda else None


def flash_varlen_available() -> bool:
    """Whether this torch has variable-length flash attention and a CUDA device to run it."""
    return torch.cuda.is_available() and _flash() is not None


def _reference(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, scale: float | None) -> Tensor:
    """Plain SDPA per sequence, bottom-right causal: the CPU kernel and the tests' reference. ``q`` ``[T, H, D]``,
    ``k``/``v`` ``[Tk, H, D]`` (already gathered, heads expanded)."""
    out = q.new_empty(q.shape)
    cu_q, cu_k = layout.cu_q.tolist(), layout.cu_k.tolist()
    for i in range(len(cu_q) - 1):
        a, b, c, d = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if b == a:
            continue
        mask = torch.ones(b - a, d - c, dtype=torch.bool, device=q.device).tril(diagonal=(d - c) - (b - a))
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[a:b] = o.transpose(0, 1)
    return out


# eager inside blocks compiled by --model.compile_layers: a flash kernel (nothing to fuse) whose layout's sizes
# change every step (traced, they would recompile)
@torch.compiler.disable
def varlen_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                     scaling: float | None = None, dropout: float = 0.0, vpa_varlen: VarlenLayout | None = None,
                     **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function (``query`` ``[1, H, T, D]``, ``key``/``value`` ``[1, H_kv, T, D]``):
    variable-length attention over ``vpa_varlen``'s sequences; without a layout, transformers' SDPA."""
    if vpa_varlen is None:
        if isinstance(attention_mask, _Placeholder):
            raise RuntimeError("packed varlen rows reached an attention layer without their layout (vpa_varlen)")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise ValueError("packed varlen attention runs without attention dropout (the family's attention_dropout is set)")
    layout = vpa_varlen
    if query.shape[0] != 1 or query.shape[2] != layout.total:
        raise RuntimeError(f"packed varlen layout of {layout.total} tokens given to an attention over {tuple(query.shape)}")
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1).index_select(0, layout.key_index)  # [Tk, H_kv, D]: each response's prefix gathered
    v = value[0].transpose(0, 1).index_select(0, layout.key_index)
    n_rep = q.shape[1] // k.shape[1]
    flash = _kernel(q)
    gqa = {}
    if n_rep > 1:
        if flash is not None and flash[2]:
            gqa = {"enable_gqa": True}
        else:  # as transformers' repeat_kv: each key/value head serves n_rep consecutive query heads
            k = k[:, :, None].expand(-1, -1, n_rep, -1).reshape(k.shape[0], -1, k.shape[2])
            v = v[:, :, None].expand(-1, -1, n_rep, -1).reshape(v.shape[0], -1, v.shape[2])
    if flash is None:
        out = _reference(q, k, v, layout, scaling)
    else:
        fn, causal, _ = flash
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # flash runs in half precision: the autocast dtype
            target = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            q, k, v = q.to(target), k.to(target), v.to(target)
        out = fn(q.contiguous(), k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scale=scaling,
                 **causal, **gqa).to(dtype)
    return out.unsqueeze(0), None  # [1, T, H, D], as transformers' attention functions return it


class _Placeholder(Tensor):
    """The 4-D ``attention_mask`` a packed varlen forward passes: transformers returns a 4-D mask as is, so no
    ``[T, T]`` mask is built; only :func:`varlen_attention` (with the layout) may receive it."""


def placeholder_mask(device: torch.device | str) -> Tensor:
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).as_subclass(_Placeholder)


def register() -> None:
    """Register :func:`varlen_attention` (and SDPA's mask builder for its plain calls) with transformers under
    :data:`NAME` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, varlen_attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(NAME, sdpa_mask)
