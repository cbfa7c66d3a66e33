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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vpa_lightning.models.chunked_head import head_token_logps
from vpa_lightning.models.logps import IGNORE_INDEX, GroupBatch, GroupLogps, _rope_index, _split_model, _unwrap_peft, select_rows

__all__ = ["PackedBatch", "PackingUnsupported", "pack_groups", "packed_logps"]


class PackingUnsupported(ValueError):
    """A batch or model that packed groups cannot run (the plain path can): ``pack="auto"`` falls back on it."""


#: Packed attention: ``auto`` (variable-length flash attention on CUDA where the family allows it, else the mask),
#: ``varlen`` (:mod:`~vpa_lightning.models.varlen`; a per-sequence SDPA reference off CUDA), ``mask`` (the segment
#: mask through the model's own attention implementation: SDPA, eager or FlexAttention).
PACKED_ATTENTION = ("auto", "varlen", "mask")

#: Packed rows of the mask path on CUDA are padded to a multiple of this many tokens, so that their shapes repeat
#: from step to step (a new shape costs SDPA's cuDNN kernel a new execution plan: whole seconds, seen on an H200).
CUDA_ROW_MULTIPLE = 64


@dataclass
class PackedBatch:
    """Packed model inputs and where each response token is scored.

    Attributes:
        model_inputs: ``input_ids`` ``[R, L]``, the attention mask (4-D or ``BlockMask``; a placeholder under
            varlen attention), ``position_ids`` (``[R, L]`` or ``[3, R, L]``), per-token inputs and each group's
            image inputs (in the order the groups appear in the packed rows).
        positions: ``[M]`` flat index into ``R * L`` of the position that predicts each scored token
            (a group's last prefix position appears once per response).
        targets: ``[M]`` the scored tokens.
        rows: ``[M]`` the batch row (response) of each scored token.
        token_index: ``[M]`` index of each scored token within its response.
        tokens: real tokens in the packed rows (padding excluded).
        forward_kwargs: Keywords the forward passes on to the attention layers (the varlen layout, FlexAttention's
            kernel options).
        attention: ``"varlen"`` or ``"mask"``: how the segments were kept apart.
    """

    model_inputs: dict[str, Any]
    positions: Tensor
    targets: Tensor
    rows: Tensor
    token_index: Tensor
    tokens: int
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    attention: str = "mask"


def _rope_media(inputs: dict[str, Any]) -> dict[str, Any]:
    """The image and video arguments of an M-RoPE model's ``get_rope_index`` from the (first rows') inputs:
    ``image_grid_thw``, ``video_grid_thw`` and Qwen2.5-VL's ``second_per_grid_ts`` (``None`` where absent)."""
    out: dict[str, Any] = {}
    for key in ("image_grid_thw", "video_grid_thw"):
        value = inputs.get(key)
        out[key] = value if value is not None and value.shape[0] else None
    if inputs.get("second_per_grid_ts") is not None:
        out["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    return out


def _text_config(model: nn.Module) -> Any:
    config = _unwrap_peft(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attn_implementation(model: nn.Module) -> str:
    config = _unwrap_peft(model).config
    return getattr(_text_config(model), "_attn_implementation", None) or getattr(config, "_attn_implementation", None) or "eager"


def _segments(batch: GroupBatch) -> list[dict[str, Any]]:
    """Per group with rows: first row, prefix length, and each row's response length (as built, truncation
    included). Groups without rows (a sub-batch, e.g. mDPO's chosen rows) are left out. The lengths come to the
    host in one copy, and that every row of a group shares its first row's prompt (and image) is checked on the
    device with one more (not row by row: each check was a host synchronisation, hundreds per step on a GPU)."""
    inputs, labels = batch.model_inputs, batch.labels
    ids = inputs["input_ids"]
    device = labels.device
    plen, n_resp, owner = torch.stack([batch.prompt_lengths.to(device), (labels != IGNORE_INDEX).sum(dim=1),
                                       batch.group_index.to(device)]).tolist()
    out = []
    first = 0
    firsts: list[int] = []  # each row's group's first row
    for g, k in enumerate(batch.group_sizes):
        if k == 0:
            continue
        rows = list(range(first, first + k))
        first += k
        if any(owner[r] != g for r in rows):
            raise PackingUnsupported("packed groups: rows must be ordered by group (build_group_batch order)")
        p = plen[rows[0]]
        if any(plen[r] != p for r in rows):
            raise PackingUnsupported(f"packed groups: the rows of group {g} do not share one prompt")
        firsts += [rows[0]] * k
        out.append({"g": g, "first": rows[0], "rows": rows, "prefix": p, "resp": [n_resp[r] for r in rows],
                    "length": p + sum(n_resp[r] for r in rows)})
    if first != len(owner):
        raise PackingUnsupported("packed groups: rows must be ordered by group (build_group_batch order)")
    if len(firsts) == len(set(firsts)):
        return out  # one row per group: nothing to compare
    p_max = max(plen)
    index = torch.tensor(firsts, device=device)
    cols = torch.arange(p_max, device=device)
    differs = ((ids[:, :p_max] != ids.index_select(0, index)[:, :p_max]) & (cols[None] < batch.prompt_lengths.to(device)[:, None])).any(dim=1)
    checks = [differs.any()]
    if "pixel_values" in inputs:  # e.g. mDPO's corrupted rows: one image per row
        theirs = select_rows(batch, index).model_inputs["pixel_values"]
        ours = inputs["pixel_values"]
        checks.append(torch.tensor(True, device=device) if theirs.shape != ours.shape else (theirs != ours).any().to(device))
    bad_prompt, *bad_pixels = torch.stack(checks).tolist()
    if bad_prompt:
        g = owner[int(differs.nonzero()[0, 0])]
        raise PackingUnsupported(f"packed groups: the rows of group {g} do not share one prompt")
    if bad_pixels and bad_pixels[0]:
        raise PackingUnsupported("packed groups: the rows of a group carry different images")
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
    text = _text_config(model)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if window is None or getattr(text, "use_sliding_window", True) is False:
        return None, True
    if types is not None:
        if "sliding_attention" not in types:
            return None, True
        return int(window), all(t == "sliding_attention" for t in types)
    return int(window), True  # Mistral: every layer slides


def _choose_attention(model: nn.Module, batch: GroupBatch, requested: str, window: int | None, on_cuda: bool) -> str:
    """``"varlen"`` or ``"mask"`` for ``requested`` (see :data:`PACKED_ATTENTION`); ``auto`` warns once, naming
    why, when a CUDA run (``on_cuda``) cannot use varlen attention."""
    from vpa_lightning.models import varlen
    from vpa_lightning.models.families import family_of
    from vpa_lightning.models.logps import _warn_once

    if requested not in PACKED_ATTENTION:
        raise ValueError(f"packed attention must be one of {PACKED_ATTENTION}, got {requested!r}")
    if requested == "mask":
        return "mask"
    impl = _attn_implementation(model)
    if requested == "auto" and (not on_cuda or impl not in ("sdpa", varlen.NAME)):
        return "mask"  # CPU, or an attention the user chose (eager, FlexAttention, ...): the mask path
    family = family_of(model)
    why = None
    if family.bidirectional_blocks is not None:
        why = f"{family.name}'s bidirectional attention ({family.bidirectional_blocks} blocks) is not causal"
    elif "cross_attention_mask" in batch.model_inputs:
        why = f"{family.name}'s text cross-attends to its own row's images"
    elif window is not None:
        why = f"its sliding window ({window} tokens) cuts into the segments"
    elif model.training and float(getattr(_text_config(model), "attention_dropout", 0.0) or 0.0) > 0:
        why = "the model applies attention dropout"
    elif requested == "auto" and not varlen.flash_varlen_available():
        why = "this torch has no torch.nn.attention.varlen"
    elif requested == "auto" and not (torch.is_autocast_enabled("cuda") or next(_unwrap_peft(model).parameters()).dtype
                                      in (torch.float16, torch.bfloat16)):
        why = "flash attention needs bf16/fp16 (float32 weights without autocast)"
    if why is not None:
        if requested == "varlen":
            raise PackingUnsupported(f"packed varlen attention: {why}")
        _warn_once(f"packed groups use the SDPA segment mask, not variable-length flash attention: {why}")
        return "mask"
    if impl != varlen.NAME:  # the text decoder's attention becomes varlen's (SDPA for every call without a layout)
        varlen.register()
        inner = _unwrap_peft(model)
        inner.set_attn_implementation({"text_config": varlen.NAME} if "text_config" in getattr(inner.config, "sub_configs", {})
                                      else varlen.NAME)
        if _attn_implementation(model) != varlen.NAME:
            raise PackingUnsupported(f"packed varlen attention: {type(inner).__name__} did not take the attention implementation")
    return "varlen"


def pack_groups(model: nn.Module, batch: GroupBatch, max_tokens: int | None = None, attention: str = "mask") -> PackedBatch:
    """Pack ``batch``'s groups into shared-prefix segments (see the module doc).

    The layout (which token goes where, its segment, response, position, and where each response token is
    scored) is computed on the host from the lengths, and the device gathers each input once with it.

    Args:
        model: The model (its attention implementation picks the mask type; M-RoPE models give positions).
        batch: Output of :func:`~vpa_lightning.models.logps.build_group_batch`.
        max_tokens: Token budget of a packed row of the mask path; ``None`` = the longest segment (each row at
            most as long as the longest group; shorter groups share rows). Varlen attention packs every group
            into one row.
        attention: One of :data:`PACKED_ATTENTION` (``"auto"``: see :func:`packed_logps`).
    """
    from vpa_lightning.models.families import family_of
    from vpa_lightning.models.varlen import placeholder_mask, varlen_layout

    inputs = batch.model_inputs
    ids = inputs["input_ids"]
    device = ids.device
    n, t = ids.shape
    segs = _segments(batch)
    if not any(sum(s["resp"]) for s in segs):
        raise PackingUnsupported("packed groups: the batch has no response token to score")
    per_token = [k for k, v in inputs.items() if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[:2] == ids.shape
                 and k not in ("input_ids", "attention_mask")]  # Mllama's cross_attention_mask [N, T, images, tiles] too
    window, every_layer = _sliding_window(model)
    if window is not None and max(s["prefix"] + max(s["resp"]) for s in segs) <= window:
        window = None  # no segment is longer than the window: it masks nothing
    mode = _choose_attention(model, batch, attention, window, device.type == "cuda")
    if mode == "varlen":
        layout = [list(range(len(segs)))]  # one row, every group in turn, no padding
    elif "cross_attention_mask" in per_token:  # Mllama: a row's text cross-attends to that row's images only
        layout = [[g] for g in range(len(segs))]
    else:
        layout = _pack([s["length"] for s in segs], max(max(s["length"] for s in segs), int(max_tokens or 0)))
    order = [g for row in layout for g in row]  # groups in row-major order: the image features' order
    n_rows, width = len(layout), max(sum(segs[g]["length"] for g in row) for row in layout)
    if mode == "mask" and device.type == "cuda":
        width = -(-width // CUDA_ROW_MULTIPLE) * CUDA_ROW_MULTIPLE
    image_inputs = {k: v for k, v in select_rows(batch, torch.tensor([segs[g]["first"] for g in order])).model_inputs.items()
                    if k not in per_token and k not in ("input_ids", "attention_mask")}
    family = family_of(model)
    blocks = family.bidirectional_blocks
    if blocks is not None and "token_type_ids" not in per_token:
        raise PackingUnsupported(f"packed groups: {family.name} needs token_type_ids for its bidirectional attention")

    # M-RoPE (Qwen2-VL family): every group's prefix positions from the model's own rope index, in one call
    rope_index = _rope_index(model) if "image_grid_thw" in inputs or "mm_token_type_ids" in inputs else None
    rope_pos = rope_next = None
    p_max = max(s["prefix"] for s in segs)
    if rope_index is not None:
        natural = torch.tensor([s["first"] for s in segs], device=device)
        cols = torch.arange(p_max, device=device)
        valid = cols[None, :] < torch.tensor([s["prefix"] for s in segs], device=device)[:, None]
        prefix_ids = ids[natural, :p_max].masked_fill(~valid, int(ids[segs[0]["first"], 0]))
        mm = inputs.get("mm_token_type_ids")
        rope_pos, _ = rope_index(
            prefix_ids, mm_token_type_ids=None if mm is None else mm[natural, :p_max] * valid,
            attention_mask=valid.long(), **_rope_media(select_rows(batch, natural).model_inputs),
        )  # [3, G, p_max]
        # responses continue after the prefix's last token (text: its three positions are equal), as in the plain
        # forward; not after the largest position, which a video's temporal positions can exceed
        last = torch.tensor([s["prefix"] - 1 for s in segs], device=device)
        rope_next = (rope_pos[0].gather(1, last[:, None])[:, 0] + 1).tolist()
    start = family.first_position  # PaliGemma counts positions from 1

    # the layout, on the host: per packed position its source in the [N, T] batch, group, response, position
    src = torch.full((n_rows, width), -1, dtype=torch.long)
    seg_id = torch.full((n_rows, width), -1, dtype=torch.long)  # group of each position (-1: padding)
    resp_id = torch.full((n_rows, width), -1, dtype=torch.long)  # response within the group (-1: prefix)
    pos = torch.zeros((n_rows, width), dtype=torch.long)  # text position (M-RoPE: of responses only)
    prefix_at = torch.zeros((n_rows, width), dtype=torch.long)  # M-RoPE: the prefix position's index in rope_pos
    score_pos, score_src, score_row, score_idx = [], [], [], []
    for r, row in enumerate(layout):
        col = 0
        for g in row:
            s = segs[g]
            first, p = s["first"], s["prefix"]
            src[r, col : col + p] = torch.arange(first * t, first * t + p)
            seg_id[r, col : col + p] = g
            if rope_next is not None:
                prefix_at[r, col : col + p] = torch.arange(g * p_max, g * p_max + p)
                nxt = int(rope_next[g])
            else:
                pos[r, col : col + p] = torch.arange(start, start + p)
                nxt = start + p
            prefix_end = r * width + col + p - 1
            col += p
            for j, (row_index, k) in enumerate(zip(s["rows"], s["resp"])):
                src[r, col : col + k] = torch.arange(row_index * t + p, row_index * t + p + k)
                seg_id[r, col : col + k] = g
                resp_id[r, col : col + k] = j
                pos[r, col : col + k] = torch.arange(nxt, nxt + k)
                # token 0 is predicted at the prefix end, token i at the position of token i - 1
                score_pos += [torch.tensor([prefix_end]), torch.arange(r * width + col, r * width + col + k - 1)]
                score_src.append(torch.arange(row_index * t + p, row_index * t + p + k))
                score_row.append(torch.full((k,), row_index))
                score_idx.append(torch.arange(k))
                col += k
    real = seg_id >= 0
    targets_src = torch.cat(score_src)
    src = torch.where(real, src, targets_src[0])  # padding repeats a response token: never an image placeholder
    host = [src, seg_id, resp_id, pos, prefix_at, torch.cat(score_pos), targets_src, torch.cat(score_row), torch.cat(score_idx)]
    sizes = [x.numel() for x in host]
    moved = torch.cat([x.flatten() for x in host]).to(device).split(sizes)  # one host-to-device copy
    src_d, seg_d, resp_d, pos_d, prefix_d = (x.view(n_rows, width) for x in moved[:5])
    score_pos_d, targets_src_d, score_row_d, score_idx_d = moved[5:]

    packed_ids = ids.reshape(-1).index_select(0, src_d.flatten()).view(n_rows, width)
    real_d = seg_d >= 0
    packed_tok = {}
    for k in per_token:
        value = inputs[k].reshape(n * t, *inputs[k].shape[2:]).index_select(0, src_d.flatten())
        value = value.view(n_rows, width, *inputs[k].shape[2:])
        packed_tok[k] = value * real_d.view(n_rows, width, *(1,) * (value.dim() - 2)).to(value.dtype)
    if rope_pos is not None:
        prefix_pos = rope_pos.reshape(3, -1).index_select(1, prefix_d.flatten()).view(3, n_rows, width)
        positions = torch.where(real_d & (resp_d < 0), prefix_pos, pos_d[None].expand(3, -1, -1))
    else:
        positions = pos_d
    targets = ids.reshape(-1).index_select(0, targets_src_d)

    forward_kwargs: dict[str, Any] = {}
    if mode == "varlen":
        mask = placeholder_mask(device)
        forward_kwargs["vpa_varlen"] = varlen_layout([segs[g]["prefix"] for g in order], [segs[g]["resp"] for g in order], device)
    else:
        block = _block_ids(seg_d, packed_tok["token_type_ids"], blocks) if blocks is not None else None
        mask = _segment_mask(model, seg_d, resp_d, block, positions[0] if rope_pos is not None else positions, window, every_layer)
        if _attn_implementation(model) == "flex_attention":
            # A packed row is scored whole (queries = keys); inductor would pick its decoding kernel (meant for a
            # few new tokens against a long cache) for rows under 128 tokens, which had no kernel configuration for
            # the small heads of the GPU check's test (torch 2.11, H200): force the attention kernel.
            forward_kwargs["kernel_options"] = {"FORCE_USE_FLEX_ATTENTION": True}
    model_inputs = {"input_ids": packed_ids, "attention_mask": mask, **packed_tok, **image_inputs, "position_ids": positions}
    return PackedBatch(
        model_inputs=model_inputs,
        positions=score_pos_d,
        targets=targets,
        rows=score_row_d,
        token_index=score_idx_d,
        tokens=int(real.sum()),
        forward_kwargs=forward_kwargs,
        attention=mode,
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
    if impl in ("sdpa", "vpa_varlen"):  # vpa_varlen runs SDPA for calls without a varlen layout
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
    attention: str = "auto",
) -> GroupLogps:
    """:func:`~vpa_lightning.models.logps.group_logps` over packed shared-prefix groups (one forward).

    ``method="hidden"`` (default) runs the decoder and scores through the chunked LM head;
    ``"forward"`` runs the model's forward with a boolean ``logits_to_keep`` over the scoring positions.
    ``token_logps`` / ``sq_probs`` as in :func:`~vpa_lightning.models.logps.group_logps`.
    ``attention`` (:data:`PACKED_ATTENTION`): ``"auto"`` runs variable-length flash attention
    (:mod:`~vpa_lightning.models.varlen`) on CUDA when the model's attention is SDPA and the family allows it
    (no bidirectional blocks, no cross-attention rows, no sliding window that cuts a segment, no attention dropout;
    else the segment mask, with one warning naming why), and the segment mask elsewhere.
    """
    from vpa_lightning.models.logps import _log_sum_sq, _scatter_tokens

    packed = pack_groups(model, batch, max_tokens, attention)
    n = batch.labels.shape[0]
    r, width = packed.model_inputs["input_ids"].shape
    extra = packed.forward_kwargs
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
