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
plain path's up to float rounding (tested for every tiny family, with truncation).

Attention: ``sdpa`` and ``eager`` take an explicit ``[rows, 1, L, L]`` mask, which transformers (>= 5)
passes through as is (boolean for SDPA, additive for eager); ``flex_attention`` gets a FlexAttention
``BlockMask`` built from the same segment ids (CUDA; not exercised by the CPU tests). Flash-attention-2
takes no arbitrary mask: use ``sdpa`` or ``flex_attention`` with packing. Since the model's own mask
rules are bypassed, the mask rebuilds them per segment: bidirectional blocks from ``token_type_ids``
(:attr:`Family.bidirectional_blocks <vpa_lightning.models.families.Family>`: Gemma 3's image runs,
PaliGemma's prefix) and a sliding window (Mistral: on every layer; Gemma 3: on some layers, as a
``{"full_attention", "sliding_attention"}`` dict) measured in positions, when a segment is longer than it.

Positions: text positions count from the family's first position per segment (PaliGemma: 1); M-RoPE
models (Qwen2-VL family) get their 3-D prefix positions from the model's own ``get_rope_index`` (one
call for every group's prefix, 0..N images each), responses continue from the largest prefix
position + 1, as the plain forward does. Mllama's text cross-attends to its row's images, so its
groups take one row each (the prefix is still shared by the group's responses).

Reproducibility: a prefix end scores every response of its group, so its logits (or hidden state) are
gathered with ``index_select``, never by indexing with repeated indices, whose backward adds with
parallel float atomics on CPU (results, and an exactly resumed run, would differ in the last bits).
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
    """Per group with rows: first row, prefix length, and each row's response length (as built, truncation
    included). Groups without rows (a sub-batch, e.g. mDPO's chosen rows) are left out."""
    ids, labels = batch.model_inputs["input_ids"], batch.labels
    plen = batch.prompt_lengths.tolist()
    n_resp = (labels != IGNORE_INDEX).sum(dim=1).tolist()
    owner = batch.group_index.tolist()
    out = []
    first = 0
    for g, k in enumerate(batch.group_sizes):
        if k == 0:
            continue
        rows = list(range(first, first + k))
        first += k
        if any(owner[r] != g for r in rows):
            raise PackingUnsupported("packed groups: rows must be ordered by group (build_group_batch order)")
        p = plen[rows[0]]
        if any(plen[r] != p for r in rows) or any(not torch.equal(ids[r, :p], ids[rows[0], :p]) for r in rows[1:]):
            raise PackingUnsupported(f"packed groups: the rows of group {g} do not share one prompt")
        if k > 1 and "pixel_values" in batch.model_inputs:  # e.g. mDPO's corrupted rows: one image per row
            pixels = [select_rows(batch, torch.tensor([r])).model_inputs["pixel_values"] for r in rows]
            if any(not torch.equal(x, pixels[0]) for x in pixels[1:]):
                raise PackingUnsupported(f"packed groups: the rows of group {g} carry different images")
        out.append({"first": rows[0], "rows": rows, "prefix": p, "resp": [n_resp[r] for r in rows],
                    "length": p + sum(n_resp[r] for r in rows)})
    if first != len(owner):
        raise PackingUnsupported("packed groups: rows must be ordered by group (build_group_batch order)")
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


def _sliding_window(model: nn.Module) -> tuple[int | None, bool]:
    """``(window, every_layer)`` of the decoder's sliding-window attention (``(None, True)``: none)."""
    config = _unwrap_peft(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if window is None or getattr(text, "use_sliding_window", True) is False:
        return None, True
    if types is not None:
        if "sliding_attention" not in types:
            return None, True
        return int(window), all(t == "sliding_attention" for t in types)
    return int(window), True  # Mistral: every layer slides


def pack_groups(model: nn.Module, batch: GroupBatch, max_tokens: int | None = None) -> PackedBatch:
    """Pack ``batch``'s groups into shared-prefix segments (see the module doc).

    Args:
        model: The model (its attention implementation picks the mask type; M-RoPE models give positions).
        batch: Output of :func:`~vpa_lightning.models.logps.build_group_batch`.
        max_tokens: Token budget of a packed row; ``None`` = the longest segment (each row at most as
            long as the longest group; shorter groups share rows).
    """
    from vpa_lightning.models.families import family_of

    inputs = batch.model_inputs
    ids = inputs["input_ids"]
    device = ids.device
    segs = _segments(batch)
    per_token = [k for k, v in inputs.items() if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[:2] == ids.shape
                 and k not in ("input_ids", "attention_mask")]  # Mllama's cross_attention_mask [N, T, images, tiles] too
    budget = max(max(s["length"] for s in segs), int(max_tokens or 0))
    if "cross_attention_mask" in per_token:  # Mllama: a row's text cross-attends to that row's images only
        layout = [[g] for g in range(len(segs))]
    else:
        layout = _pack([s["length"] for s in segs], budget)
    order = [g for row in layout for g in row]  # groups in row-major order: the image features' order
    n_rows, width = len(layout), max(sum(segs[g]["length"] for g in row) for row in layout)
    firsts = torch.tensor([segs[g]["first"] for g in order], device=device)
    image_inputs = {k: v for k, v in select_rows(batch, firsts).model_inputs.items()
                    if k not in per_token and k not in ("input_ids", "attention_mask")}
    family = family_of(model)
    blocks = family.bidirectional_blocks
    if blocks is not None and "token_type_ids" not in per_token:
        raise PackingUnsupported(f"packed groups: {family.name} needs token_type_ids for its bidirectional attention")

    # M-RoPE (Qwen2-VL family): every group's prefix positions from the model's own rope index, in one call
    rope_index = _rope_index(model) if "image_grid_thw" in inputs or "mm_token_type_ids" in inputs else None
    rope_pos = None
    if rope_index is not None:
        natural = torch.tensor([s["first"] for s in segs], device=device)
        p_max = max(s["prefix"] for s in segs)
        cols = torch.arange(p_max, device=device)
        valid = cols[None, :] < torch.tensor([s["prefix"] for s in segs], device=device)[:, None]
        prefix_ids = ids[natural, :p_max].masked_fill(~valid, int(ids[natural[0], 0]))
        grids = select_rows(batch, natural).model_inputs.get("image_grid_thw")
        mm = inputs.get("mm_token_type_ids")
        rope_pos, _ = rope_index(
            prefix_ids, mm_token_type_ids=None if mm is None else mm[natural, :p_max] * valid,
            image_grid_thw=grids if grids is not None and grids.shape[0] else None, attention_mask=valid.long(),
        )  # [3, G, p_max]
        rope_next = (rope_pos.masked_fill(~valid[None], 0).amax(dim=(0, 2)) + 1).tolist()
    start = family.first_position  # PaliGemma counts positions from 1

    pad_id = int(batch.labels[batch.labels != IGNORE_INDEX][0])  # a text token: never an image placeholder
    packed_ids = ids.new_full((n_rows, width), pad_id)
    packed_tok = {k: inputs[k].new_zeros((n_rows, width, *inputs[k].shape[2:])) for k in per_token}
    seg_id = torch.full((n_rows, width), -1, dtype=torch.long, device=device)  # group of each position (-1: padding)
    resp_id = torch.full((n_rows, width), -1, dtype=torch.long, device=device)  # response within the group (-1: prefix)
    pos_dims = 3 if rope_pos is not None else 1
    positions = torch.zeros((pos_dims, n_rows, width), dtype=torch.long, device=device)
    score_pos, score_tgt, score_row, score_idx = [], [], [], []
    for r, row in enumerate(layout):
        col = 0
        for g in row:
            s = segs[g]
            first, p = s["first"], s["prefix"]
            packed_ids[r, col : col + p] = ids[first, :p]
            for k in per_token:
                packed_tok[k][r, col : col + p] = inputs[k][first, :p]
            seg_id[r, col : col + p] = g
            if rope_pos is not None:
                positions[:, r, col : col + p] = rope_pos[:, g, :p]
                nxt = int(rope_next[g])
            else:
                positions[0, r, col : col + p] = torch.arange(start, start + p, device=device)
                nxt = start + p
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
                score_pos.append(torch.cat([torch.tensor([prefix_end]), torch.arange(r * width + col, r * width + col + n - 1)]))
                score_tgt.append(resp)
                score_row.append(torch.full((n,), row_index))
                score_idx.append(torch.arange(n))
                col += n
    real = int((seg_id >= 0).sum())
    block = None
    if blocks is not None:
        block = _block_ids(seg_id, packed_tok["token_type_ids"], blocks)
    window, every_layer = _sliding_window(model)
    if window is not None and max(s["prefix"] + max(s["resp"]) for s in segs) <= window:
        window = None  # no segment is longer than the window: it masks nothing
    mask = _segment_mask(model, seg_id, resp_id, block, positions[0], window, every_layer)
    model_inputs = {"input_ids": packed_ids, "attention_mask": mask, **packed_tok, **image_inputs,
                    "position_ids": positions if rope_pos is not None else positions[0]}
    return PackedBatch(
        model_inputs=model_inputs,
        positions=torch.cat(score_pos).to(device),
        targets=torch.cat(score_tgt).to(device),
        rows=torch.cat(score_row).to(device),
        token_index=torch.cat(score_idx).to(device),
        tokens=real,
    )


def _block_ids(seg_id: Tensor, token_types: Tensor, rule: str) -> Tensor:
    """``[R, L]`` id of the bidirectional block of each position (-1: none), never across segments."""
    if rule == "prefix":  # PaliGemma: the whole image + prompt prefix (token type 0) of a segment
        return torch.where((token_types == 0) & (seg_id >= 0), seg_id, -1)
    if rule == "image":  # Gemma 3: each run of image tokens (token type 1)
        is_image = (token_types == 1) & (seg_id >= 0)
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, torch.cumsum(starts.long(), dim=1), -1)
    raise ValueError(f"unknown bidirectional_blocks {rule!r}")


def _allowed(seg_id: Tensor, resp_id: Tensor, block: Tensor | None = None, pos: Tensor | None = None,
             window: int | None = None) -> Tensor:
    """``[R, L, L]`` bool: query i may attend key j (same group, j <= i, j in the prefix or in i's response;
    or both in one bidirectional ``block``; with ``window``, ``pos[j] > pos[i] - window`` too)."""
    n = seg_id.shape[1]
    idx = torch.arange(n, device=seg_id.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = seg_id[:, :, None] == seg_id[:, None, :]
    visible = (resp_id[:, None, :] < 0) | (resp_id[:, :, None] == resp_id[:, None, :])
    allowed = causal & same & visible
    if block is not None:
        allowed |= (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    if window is not None:
        allowed &= pos[:, None, :] > pos[:, :, None] - window
    return allowed | torch.eye(n, dtype=torch.bool, device=seg_id.device)[None]  # padding sees itself: no empty row


def _segment_mask(model: nn.Module, seg_id: Tensor, resp_id: Tensor, block: Tensor | None = None,
                  pos: Tensor | None = None, window: int | None = None, every_layer: bool = True) -> Any:
    """The attention mask the model takes for the packed rows; with a sliding window on some layers only
    (Gemma 3), ``{"full_attention": ..., "sliding_attention": ...}`` as transformers' hybrid models take it."""
    if window is not None and not every_layer:
        return {"full_attention": _segment_mask(model, seg_id, resp_id, block, pos),
                "sliding_attention": _segment_mask(model, seg_id, resp_id, block, pos, window)}
    impl = _attn_implementation(model)
    if impl == "flex_attention":  # CUDA path: a block-sparse mask from the same rule (not run by the CPU tests)
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            ok = (seg_id[b, q] == seg_id[b, k]) & (k <= q) & ((resp_id[b, k] < 0) | (resp_id[b, q] == resp_id[b, k]))
            if block is not None:
                ok = ok | ((block[b, q] == block[b, k]) & (block[b, q] >= 0))
            if window is not None:
                ok = ok & (pos[b, k] > pos[b, q] - window)
            return ok | (q == k)

        n = seg_id.shape[1]
        return create_block_mask(mask_mod, B=seg_id.shape[0], H=None, Q_LEN=n, KV_LEN=n, device=seg_id.device)
    allowed = _allowed(seg_id, resp_id, block, pos, window)[:, None]  # [R, 1, L, L]
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
    # A packed row is scored whole (queries = keys); under FlexAttention inductor would pick its decoding kernel
    # (meant for a few new tokens against a long cache) for rows under 128 tokens, which had no kernel
    # configuration for the small heads of the GPU check's test (torch 2.11, H200): force the attention kernel.
    extra = {"kernel_options": {"FORCE_USE_FLEX_ATTENTION": True}} if _attn_implementation(model) == "flex_attention" else {}
    if method == "hidden":
        base, head, cap = _split_model(model)
        hidden = base(**packed.model_inputs, **extra, use_cache=False, return_dict=True).last_hidden_state
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
        out = model(**packed.model_inputs, **extra, logits_to_keep=keep.view(r, width), use_cache=False, return_dict=True)
        # logits come in row-major order of the kept positions; map each scored token to its row
        slot = torch.cumsum(keep.long(), 0) - 1
        # index_select, not logits[idx]: a prefix end scores K responses, and the backward of indexing with
        # repeated indices (index_put_ with accumulate) adds with parallel float atomics on CPU: not bit-reproducible
        logits = out.logits.float().index_select(0, slot[packed.positions])
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
