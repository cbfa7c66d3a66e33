"""Packed shared-prefix groups: one forward, no KV cache, each group's image + prompt once.

The method of "Prefix sharing for preference tuning" (arXiv 2410.20305), for VLMs. A group becomes
one segment ``[image + prompt | response 1 | ... | response K]``; its attention mask lets every
response token see the prefix and the earlier tokens of its own response only, and each response's
positions continue from the prefix end (as if it followed the prompt alone). Several segments are
packed into one row up to a token budget with no padding between them (rows are right-padded to the
longest row). The logits at the prefix's last position score every response's first token; the other
response tokens are scored at their own positions, through the chunked LM head
(:mod:`vpa_lightning.models.chunked_head`).

Unlike prefix sharing over a KV cache (``share_prefix``), this is one ordinary forward: it works
with gradient checkpointing and under FSDP / DeepSpeed, and its log-probs and gradients equal the
plain path's up to float rounding (tested for LLaVA, Qwen2-VL, Idefics3, with truncation).

Attention: ``sdpa`` and ``eager`` take an explicit ``[rows, 1, L, L]`` mask, which transformers (>= 5)
passes through as is (boolean for SDPA, additive for eager); ``flex_attention`` gets a FlexAttention
``BlockMask`` built from the same segment ids (CUDA; not exercised by the CPU tests). Flash-attention-2
takes no arbitrary mask: use ``sdpa`` or ``flex_attention`` with packing.

Positions: text positions count from 0 per segment; M-RoPE models (Qwen2-VL family) get their 3-D
prefix positions from the model's own ``get_rope_index`` (one call per group's prefix), responses
continue from the largest prefix position + 1, as the plain forward does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vpa_lightning.models.chunked_head import head_token_logps
from vpa_lightning.models.logps import IGNORE_INDEX, GroupBatch, GroupLogps, _rope_index, _split_model, _unwrap_peft, select_rows

__all__ = ["PackedBatch", "PackingUnsupported", "pack_groups", "packed_logps"]


class PackingUnsupported(ValueError):
    """A batch or model that packed groups cannot run (the plain path can): ``pack="auto"`` falls back on it."""


@dataclass
class PackedBatch:
    """Packed model inputs and where each response token is scored.

    Attributes:
        model_inputs: ``input_ids`` ``[R, L]``, the attention mask (4-D or ``BlockMask``),
            ``position_ids`` (``[R, L]`` or ``[3, R, L]``), per-token inputs and each group's image inputs
            (in the order the groups appear in the packed rows).
        positions: ``[M]`` flat index into ``R * L`` of the position that predicts each scored token
            (a group's last prefix position appears once per response).
        targets: ``[M]`` the scored tokens.
        rows: ``[M]`` the batch row (response) of each scored token.
        token_index: ``[M]`` index of each scored token within its response.
        tokens: real tokens in the packed rows (padding excluded).
    """

    model_inputs: dict[str, Any]
    positions: Tensor
    targets: Tensor
    rows: Tensor
    token_index: Tensor
    tokens: int


def _attn_implementation(model: nn.Module) -> str:
    config = _unwrap_peft(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"


def _segments(batch: GroupBatch) -> list[dict[str, Any]]:
    """Per group: first row, prefix length, and each row's response token ids (as built, truncation included)."""
    ids, labels = batch.model_inputs["input_ids"], batch.labels
    sizes = batch.group_sizes
    starts = [0]
    for k in sizes[:-1]:
        starts.append(starts[-1] + k)
    plen = batch.prompt_lengths.tolist()
    n_resp = (labels != IGNORE_INDEX).sum(dim=1).tolist()
    out = []
    for g, (first, k) in enumerate(zip(starts, sizes)):
        rows = list(range(first, first + k))
        p = plen[first]
        if any(plen[r] != p for r in rows) or any(not torch.equal(ids[r, :p], ids[first, :p]) for r in rows[1:]):
            raise PackingUnsupported(f"packed groups: the rows of group {g} do not share one prompt")
        if int(batch.group_index[first]) != g or any(int(batch.group_index[r]) != g for r in rows):
            raise PackingUnsupported("packed groups: rows must be ordered by group (build_group_batch order)")
        if k > 1 and "pixel_values" in batch.model_inputs:  # e.g. mDPO's corrupted rows: one image per row
            pixels = [select_rows(batch, torch.tensor([r])).model_inputs["pixel_values"] for r in rows]
            if any(not torch.equal(p, pixels[0]) for p in pixels[1:]):
                raise PackingUnsupported(f"packed groups: the rows of group {g} carry different images")
        out.append({"first": first, "rows": rows, "prefix": p, "resp": [n_resp[r] for r in rows],
                    "length": p + sum(n_resp[r] for r in rows)})
    return out


def _pack(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing of segment lengths into rows of at most ``budget`` tokens (a longer segment gets its own row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[g] <= left:
                rows[r].append(g)
                room[r] -= lengths[g]
                break
        else:
            rows.append([g])
            room.append(budget - lengths[g])
    return [sorted(r) for r in rows]


def pack_groups(model: nn.Module, batch: GroupBatch, max_tokens: int | None = None) -> PackedBatch:
    """Pack ``batch``'s groups into shared-prefix segments (see the module doc).

    Args:
        model: The model (its attention implementation picks the mask type; M-RoPE models give positions).
        batch: Output of :func:`~vpa_lightning.models.logps.build_group_batch`.
        max_tokens: Token budget of a packed row; ``None`` = the longest segment (each row at most as
            long as the longest group; shorter groups share rows).
    """
    inputs = batch.model_inputs
    ids = inputs["input_ids"]
    device = ids.device
    segs = _segments(batch)
    budget = max(max(s["length"] for s in segs), int(max_tokens or 0))
    layout = _pack([s["length"] for s in segs], budget)
    order = [g for row in layout for g in row]  # groups in row-major order: the image features' order
    n_rows, width = len(layout), max(sum(segs[g]["length"] for g in row) for row in layout)
    per_token = [k for k, v in inputs.items() if isinstance(v, Tensor) and v.shape == ids.shape and k not in ("input_ids", "attention_mask")]
    firsts = torch.tensor([segs[g]["first"] for g in order], device=device)
    image_inputs = {k: v for k, v in select_rows(batch, firsts).model_inputs.items()
                    if k not in per_token and k not in ("input_ids", "attention_mask")}
    rope_index = _rope_index(model) if "image_grid_thw" in image_inputs else None
    if rope_index is not None and image_inputs["image_grid_thw"].shape[0] != len(order):
        raise PackingUnsupported("packed groups: M-RoPE positions need exactly one image per group; use the plain path")
    if "token_type_ids" in per_token:  # PaliGemma / Gemma-3: attention over image tokens depends on token types
        raise PackingUnsupported("packed groups: models whose attention follows token_type_ids (PaliGemma, Gemma-3) need the plain path")

    pad_id = int(batch.labels[batch.labels != IGNORE_INDEX][0])  # a text token: never an image placeholder
    packed_ids = ids.new_full((n_rows, width), pad_id)
    packed_tok = {k: inputs[k].new_zeros((n_rows, width)) for k in per_token}
    seg_id = torch.full((n_rows, width), -1, dtype=torch.long)  # group of each position (-1: padding)
    resp_id = torch.full((n_rows, width), -1, dtype=torch.long)  # response within the group (-1: prefix)
    pos_dims = 3 if rope_index is not None else 1
    positions = torch.zeros((pos_dims, n_rows, width), dtype=torch.long, device=device)
    score_pos, score_tgt, score_row, score_idx = [], [], [], []
    grid_at = 0
    for r, row in enumerate(layout):
        col = 0
        for g in row:
            s = segs[g]
            first, p = s["first"], s["prefix"]
            packed_ids[r, col : col + p] = ids[first, :p]
            for k in per_token:
                packed_tok[k][r, col : col + p] = inputs[k][first, :p]
            seg_id[r, col : col + p] = g
            if rope_index is not None:
                grid = image_inputs["image_grid_thw"][grid_at : grid_at + 1]
                pos, _ = rope_index(
                    ids[first : first + 1, :p], mm_token_type_ids=inputs["mm_token_type_ids"][first : first + 1, :p]
                    if "mm_token_type_ids" in inputs else None, image_grid_thw=grid,
                    attention_mask=torch.ones((1, p), dtype=torch.long, device=device),
                )
                positions[:, r, col : col + p] = pos[:, 0]
                nxt = int(pos.max()) + 1
            else:
                positions[0, r, col : col + p] = torch.arange(p, device=device)
                nxt = p
            grid_at += 1
            prefix_end = r * width + col + p - 1
            col += p
            for j, (row_index, n) in enumerate(zip(s["rows"], s["resp"])):
                resp = ids[row_index, p : p + n]
                packed_ids[r, col : col + n] = resp
                for k in per_token:
                    packed_tok[k][r, col : col + n] = inputs[k][row_index, p : p + n]
                seg_id[r, col : col + n] = g
                resp_id[r, col : col + n] = j
                positions[:, r, col : col + n] = torch.arange(nxt, nxt + n, device=device)
                # token 0 is predicted at the prefix end, token i at the position of token i - 1
                score_pos.append(torch.tensor([prefix_end] + list(range(r * width + col, r * width + col + n - 1))))
                score_tgt.append(resp)
                score_row.append(torch.full((n,), row_index))
                score_idx.append(torch.arange(n))
                col += n
    real = int((seg_id >= 0).sum())
    mask = _segment_mask(model, seg_id.to(device), resp_id.to(device), ids.dtype)
    model_inputs = {"input_ids": packed_ids, "attention_mask": mask, **packed_tok, **image_inputs,
                    "position_ids": positions if rope_index is not None else positions[0]}
    return PackedBatch(
        model_inputs=model_inputs,
        positions=torch.cat(score_pos).to(device),
        targets=torch.cat(score_tgt).to(device),
        rows=torch.cat(score_row).to(device),
        token_index=torch.cat(score_idx).to(device),
        tokens=real,
    )


def _allowed(seg_id: Tensor, resp_id: Tensor) -> Tensor:
    """``[R, L, L]`` bool: query i may attend key j (same group, j <= i, j in the prefix or in i's response)."""
    n = seg_id.shape[1]
    idx = torch.arange(n, device=seg_id.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = seg_id[:, :, None] == seg_id[:, None, :]
    visible = (resp_id[:, None, :] < 0) | (resp_id[:, :, None] == resp_id[:, None, :])
    allowed = causal & same & visible
    return allowed | torch.eye(n, dtype=torch.bool, device=seg_id.device)[None]  # padding sees itself: no empty row


def _segment_mask(model: nn.Module, seg_id: Tensor, resp_id: Tensor, _dtype: torch.dtype) -> Any:
    impl = _attn_implementation(model)
    if impl == "flex_attention":  # CUDA path: a block-sparse mask from the same rule (not run by the CPU tests)
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return (seg_id[b, q] == seg_id[b, k]) & (k <= q) & ((resp_id[b, k] < 0) | (resp_id[b, q] == resp_id[b, k]) | (q == k))

        n = seg_id.shape[1]
        return create_block_mask(mask_mod, B=seg_id.shape[0], H=None, Q_LEN=n, KV_LEN=n, device=seg_id.device)
    allowed = _allowed(seg_id, resp_id)[:, None]  # [R, 1, L, L]
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = next(_unwrap_peft(model).parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    raise PackingUnsupported(
        f"packed groups need an attention implementation that takes an arbitrary mask ('sdpa', 'eager' or "
        f"'flex_attention'); this model uses {impl!r}"
    )


def packed_logps(
    model: nn.Module,
    batch: GroupBatch,
    method: str = "hidden",
    chunk_size: int = 256,
    max_tokens: int | None = None,
    token_logps: bool = False,
    sq_probs: bool = False,
) -> GroupLogps:
    """:func:`~vpa_lightning.models.logps.group_logps` over packed shared-prefix groups (one forward).

    ``method="hidden"`` (default) runs the decoder and scores through the chunked LM head;
    ``"forward"`` runs the model's forward with a boolean ``logits_to_keep`` over the scoring positions.
    ``token_logps`` / ``sq_probs`` as in :func:`~vpa_lightning.models.logps.group_logps`.
    """
    from vpa_lightning.models.logps import _log_sum_sq, _scatter_tokens

    packed = pack_groups(model, batch, max_tokens)
    n = batch.labels.shape[0]
    r, width = packed.model_inputs["input_ids"].shape
    if method == "hidden":
        base, head, cap = _split_model(model)
        hidden = base(**packed.model_inputs, use_cache=False, return_dict=True).last_hidden_state
        states = hidden.reshape(r * width, -1).index_select(0, packed.positions)
        flat = head_token_logps(head, states, packed.targets, chunk_size, cap)
        sq = None
        if sq_probs:  # no gradient: chunk by chunk, nothing kept
            with torch.no_grad():
                parts = []
                for s in range(0, states.shape[0], chunk_size):
                    chunk = head(states[s : s + chunk_size]).float()
                    parts.append(_log_sum_sq(torch.tanh(chunk / cap) * cap if cap else chunk))
                sq = torch.cat(parts) if parts else flat.new_zeros(0)
    elif method == "forward":
        keep = torch.zeros(r * width, dtype=torch.bool, device=packed.positions.device)
        keep[packed.positions] = True
        out = model(**packed.model_inputs, logits_to_keep=keep.view(r, width), use_cache=False, return_dict=True)
        # logits come in row-major order of the kept positions; map each scored token to its row
        slot = torch.cumsum(keep.long(), 0) - 1
        logits = out.logits.float()[slot[packed.positions]]
        flat = torch.log_softmax(logits, dim=-1).gather(1, packed.targets[:, None])[:, 0]
        sq = _log_sum_sq(logits) if sq_probs else None
    else:
        raise ValueError(f"method must be 'forward' or 'hidden', got {method!r}")
    sum_logps = torch.zeros(n, dtype=torch.float32, device=flat.device).index_add(0, packed.rows, flat.float())
    n_tokens = torch.bincount(packed.rows, minlength=n).to(batch.labels.device)
    out = GroupLogps(sum_logps=sum_logps, n_tokens=n_tokens, group_index=batch.group_index, group_sizes=list(batch.group_sizes))
    if token_logps:
        out.token_logps = _scatter_tokens(flat.float(), packed.rows, packed.token_index, n, int(n_tokens.max()) if n else 0)
    if sq is not None:
        out.log_sum_sq_probs = torch.zeros(n, dtype=torch.float32, device=flat.device).index_add(0, packed.rows, sq)
    return out
