"""Sequence log-probs of K responses per (image(s), prompt) group, in one forward pass.

A *group* is one prompt with its images (0..N: text-only and multi-image groups too) and K >= 1
candidate responses (K = 2 for a chosen/rejected pair, K > 2 for ranked lists; K = 1 is allowed,
e.g. for mDPO's corrupted-image pass over the chosen response). For every response we build one
sequence

    chat_template(prompt with images, add_generation_prompt=True) + response turn

where the templated prompt goes through the processor (which expands each image placeholder into
the family's image tokens and produces the pixel tensors) and the response turn is what the
template writes for the assistant message after the generation prompt, up to and including its
end-of-turn token (see :meth:`vpa_lightning.models.families.Family.response_text`), tokenised
separately (no special tokens added). Together they are the tokens of the family's own
``apply_chat_template([user, assistant], tokenize=True)``; tokenising prompt and response apart
makes the response boundary exact, as in TRL.

All sequences of the batch (sum of K over groups) are right-padded into one
batch and run through the model **once**. Log-probs are computed only at
response positions: either through the model's forward with a boolean
``logits_to_keep`` mask (transformers >= 5), or by gathering the decoder's last
hidden states at the positions that predict a response token and applying the
LM head to those rows only; full-vocabulary logits are never built for image,
prompt or padding positions.

Every processor output (``pixel_values``, ``image_grid_thw``, ``image_sizes``,
``pixel_attention_mask``, ``mm_token_type_ids``, ...) but the family's
``dropped_inputs`` (PaliGemma's ``labels``) is passed to the model; per-token
outputs (``[N, T, ...]``) are extended over the response, 2-D ones with 0 (text
token; the family's ``response_fill`` for PaliGemma's ``token_type_ids``: 1,
the causal suffix), others with the last prompt token's value (Mllama's
``cross_attention_mask``), and padded with 0. The image inputs are built for every sequence
(the image of a group is repeated K times), which keeps batching
family-agnostic, but the vision tower runs **once per group**: during the
forward, the model's ``get_image_features`` is given the first row of each
group and its per-image features are reused for the group's other rows (see
:func:`encode_images_once`; identical log-probs and gradients, tested per
family).

Truncation never cuts image tokens: with ``max_length`` the response is cut
from the end; if the prompt alone (image tokens included) leaves no room for
at least one response token, a ``ValueError`` names the group.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpa_lightning.models.families import family_of
from vpa_lightning.models.chunked_head import head_token_logps

__all__ = [
    "GroupBatch",
    "GroupLogps",
    "PreferenceGroup",
    "build_group_batch",
    "encode_images_once",
    "group_logps",
    "offsets_place_images",
    "prompt_messages",
]

IGNORE_INDEX = -100


@dataclass
class PreferenceGroup:
    """One image + prompt with K candidate responses.

    Attributes:
        image: The image (anything the processor's image processor accepts, e.g. a PIL image);
            ``None`` with ``images`` given.
        prompt: The user text; or a full chat as a list of messages (``{"role", "content"}``)
            whose content parts hold one ``{"type": "image"}`` per image.
        responses: The K >= 1 response texts (for a preference pair, by convention
            ``[chosen, rejected]``).
        id: Optional identifier used in error messages.
        images: Several images (in placeholder order) or none (a text-only group, ``[]``); when
            set it replaces ``image``.
        image_offsets: Where each image sits in a text ``prompt``: the number of characters of the
            prompt before it (the shards' per-image ``offset``), non-decreasing. The user turn is then
            the prompt cut at those points with an image part in each cut (see :func:`prompt_messages`).
            ``None`` (default): every image part before the text.
        videos: The group's videos (:class:`~vpa_lightning.models.video.VideoClip`, sampled frames), in
            ``<video>`` placeholder order; ``None`` or ``[]``: none. Only families that take video
            (:meth:`~vpa_lightning.models.families.Family.takes_video`) accept them.
        video_offsets: Where each video sits in a text ``prompt``, as ``image_offsets``; ``None``: every
            video part before the text (after the images).
    """

    image: Any
    prompt: str | list[dict[str, Any]]
    responses: Sequence[str]
    id: str | None = None
    images: Sequence[Any] | None = None
    image_offsets: Sequence[int] | None = None
    videos: Sequence[Any] | None = None
    video_offsets: Sequence[int] | None = None

    @property
    def all_images(self) -> list[Any]:
        """The group's images in placeholder order: ``images`` when given (0..N), else ``[image]``."""
        if self.images is not None:
            return list(self.images)
        return [] if self.image is None else [self.image]

    @property
    def all_videos(self) -> list[Any]:
        """The group's videos in placeholder order (``[]``: none)."""
        return list(self.videos) if self.videos else []


@dataclass
class GroupBatch:
    """Model inputs for all sequences of a list of groups (``N = sum(K)`` rows).

    Attributes:
        model_inputs: Everything to pass to the model: ``input_ids`` ``[N, T]``,
            ``attention_mask`` ``[N, T]`` and every other processor output.
        labels: ``[N, T]`` copy of ``input_ids`` with ``-100`` on prompt, image and padding tokens.
        group_index: ``[N]`` index of the group each row belongs to.
        group_sizes: K of each group.
        prompt_lengths: ``[N]`` number of prompt tokens (image tokens included) of each row.
        truncated: ``[N]`` bool, whether the response of the row was truncated.
        image_counts: ``[N]`` images of each row (``None``: one each).
        pixel_rows: ``[N]`` rows of ``pixel_values`` each row owns, when ``pixel_values`` is laid out
            per image or per crop/patch rather than one entry per row (``None``: one entry per row).
        image_inputs: Names of the model inputs with one entry per image (``image_sizes``,
            ``image_grid_thw``); every other non-token input has one entry per row.
        video_counts: ``[N]`` videos of each row (``None``: a batch without videos).
        video_pixel_rows: ``[N]`` rows of ``pixel_values_videos`` each row owns (flat patches, Qwen2-VL).
        video_inputs: Names of the model inputs with one entry per video (``video_grid_thw``,
            ``second_per_grid_ts``).
    """

    model_inputs: dict[str, Any]
    labels: Tensor
    group_index: Tensor
    group_sizes: list[int]
    prompt_lengths: Tensor
    truncated: Tensor
    image_counts: Tensor | None = None
    pixel_rows: Tensor | None = None
    image_inputs: tuple[str, ...] = ()
    video_counts: Tensor | None = None
    video_pixel_rows: Tensor | None = None
    video_inputs: tuple[str, ...] = ()

    def to(self, device: torch.device | str) -> GroupBatch:
        """Move all tensors to ``device`` (returns a new object)."""

        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, Tensor) else x

        return GroupBatch(
            model_inputs={k: move(v) for k, v in self.model_inputs.items()},
            labels=self.labels.to(device),
            group_index=self.group_index.to(device),
            group_sizes=list(self.group_sizes),
            prompt_lengths=self.prompt_lengths.to(device),
            truncated=self.truncated.to(device),
            image_counts=move(self.image_counts),
            pixel_rows=move(self.pixel_rows),
            image_inputs=self.image_inputs,
            video_counts=move(self.video_counts),
            video_pixel_rows=move(self.video_pixel_rows),
            video_inputs=self.video_inputs,
        )


def _ranges(counts: Tensor, rows: list[int]) -> Tensor:
    """Indices of the entries owned by ``rows`` when row ``i`` owns ``counts[i]`` consecutive entries."""
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    sizes = counts.tolist()
    return torch.tensor([j for r in rows for j in range(starts[r], starts[r] + sizes[r])], dtype=torch.long)


def select_rows(batch: GroupBatch, rows: Tensor) -> GroupBatch:
    """The sub-batch of rows ``rows`` (e.g. the chosen responses, for mDPO's corrupted-image pass).

    Per-row tensors (``[N, ...]``: token inputs, Idefics3/Mllama ``pixel_values`` and their masks)
    are indexed; ``pixel_values`` laid out per image or per crop/patch (LLaVA, InternVL's crops,
    Qwen-VL's flat patches) are gathered by each row's range (``batch.pixel_rows``), and per-image
    inputs (``image_sizes``, ``image_grid_thw``) by each row's images (``batch.image_counts``).
    """
    n = batch.labels.shape[0]
    picked = rows.tolist()  # before the move: rows built on the host cost the device no synchronisation
    rows = rows.to(batch.labels.device)
    counts = batch.image_counts if batch.image_counts is not None else torch.ones(n, dtype=torch.long)
    inputs: dict[str, Any] = {}
    for key, value in batch.model_inputs.items():
        if key == "pixel_values" and batch.pixel_rows is not None:
            inputs[key] = value[_ranges(batch.pixel_rows.cpu(), picked).to(value.device)]
        elif key == "pixel_values_videos" and batch.video_pixel_rows is not None:
            inputs[key] = value[_ranges(batch.video_pixel_rows.cpu(), picked).to(value.device)]
        elif key in batch.video_inputs and batch.video_counts is not None:
            inputs[key] = value[_ranges(batch.video_counts.cpu(), picked).to(value.device)]
        elif key in batch.image_inputs:
            inputs[key] = value[_ranges(counts.cpu(), picked).to(value.device)]
        elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            inputs[key] = value[rows]
        else:
            raise ValueError(f"cannot select rows of model input {key!r} with shape {tuple(getattr(value, 'shape', ()))}")
    group_index = batch.group_index[rows]
    return GroupBatch(
        model_inputs=inputs,
        labels=batch.labels[rows],
        group_index=group_index,
        group_sizes=torch.bincount(group_index, minlength=len(batch.group_sizes)).tolist(),
        prompt_lengths=batch.prompt_lengths[rows],
        truncated=batch.truncated[rows],
        image_counts=None if batch.image_counts is None else batch.image_counts[rows],
        pixel_rows=None if batch.pixel_rows is None else batch.pixel_rows[rows],
        image_inputs=batch.image_inputs,
        video_counts=None if batch.video_counts is None else batch.video_counts[rows],
        video_pixel_rows=None if batch.video_pixel_rows is None else batch.video_pixel_rows[rows],
        video_inputs=batch.video_inputs,
    )


@dataclass
class GroupLogps:
    """Per-response log-probs.

    Attributes:
        sum_logps: ``[N]`` summed log-probs of the response tokens (suffix included).
        n_tokens: ``[N]`` number of response tokens scored.
        group_index: ``[N]`` group of each row.
        group_sizes: K of each group.
        token_logps: ``[N, R]`` per-token log-probs of the responses (zero past each row's end),
            when asked for (``token_logps=True``; LD-DPO).
        log_sum_sq_probs: ``[N]`` sum over the response positions of ``log sum_v p(v)^2`` (no
            gradient), when asked for (``sq_probs=True``; WPO's weight alignment).
    """

    sum_logps: Tensor
    n_tokens: Tensor
    group_index: Tensor
    group_sizes: list[int] = field(default_factory=list)
    token_logps: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None

    @property
    def mean_logps(self) -> Tensor:
        """``[N]`` length-averaged log-probs (``sum_logps / n_tokens``)."""
        return self.sum_logps / self.n_tokens.clamp(min=1).to(self.sum_logps.dtype)

    def per_group(self, average: bool = False) -> list[Tensor]:
        """Split into one ``[K_g]`` tensor per group (summed, or averaged if ``average``)."""
        values = self.mean_logps if average else self.sum_logps
        return list(torch.split(values, self.group_sizes))

    def as_matrix(self, average: bool = False) -> Tensor:
        """``[G, K]`` view when all groups have the same K (column 0 = first response, etc.)."""
        if len(set(self.group_sizes)) != 1:
            raise ValueError(f"groups have different sizes {self.group_sizes}; use per_group()")
        values = self.mean_logps if average else self.sum_logps
        return values.view(len(self.group_sizes), self.group_sizes[0])


def offsets_place_images(offsets: Sequence[int], prompt_length: int) -> bool:
    """Whether image ``offsets`` (characters before each image) fit a prompt of ``prompt_length``
    characters: each in ``[0, prompt_length]``, non-decreasing."""
    return all(0 <= a <= b for a, b in zip([0, *offsets], [*offsets, prompt_length]))


def prompt_messages(
    prompt: str | list[dict[str, Any]], n_images: int = 1, offsets: Sequence[int] | None = None,
    n_videos: int = 0, video_offsets: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for a prompt: a plain string becomes one user turn ``[image] * n_images + [text]``
    (no image part for a text-only prompt), or with ``offsets`` (characters of the prompt before
    each image, non-decreasing) the prompt cut at those points with an image part in each cut:
    ``"Compare  with : which?"`` at ``[8, 14]`` gives ``[text "Compare ", image, text " with ",
    image, text ": which?"]`` (no empty text parts), so the chat template puts each image where the
    prompt had it. A message list is used as it is.

    ``n_videos`` videos get ``{"type": "video"}`` parts the same way, at ``video_offsets`` (``None``: before
    the text, after the images); an image and a video at the same offset keep images first. Without videos
    the messages are exactly as above."""
    if not isinstance(prompt, str):
        return list(prompt)
    if n_videos:
        return _media_messages(prompt, n_images, offsets, n_videos, video_offsets)
    if offsets is None:
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
    offsets = [int(o) for o in offsets]
    if len(offsets) != n_images or not offsets_place_images(offsets, len(prompt)):
        raise ValueError(
            f"image offsets {offsets} do not place {n_images} image(s) in a prompt of {len(prompt)} characters "
            "(one non-decreasing offset in [0, len(prompt)] per image)"
        )
    content: list[dict[str, Any]] = []
    start = 0
    for at in offsets:
        if at > start:
            content.append({"type": "text", "text": prompt[start:at]})
        content.append({"type": "image"})
        start = at
    if start < len(prompt) or not content:
        content.append({"type": "text", "text": prompt[start:]})
    return [{"role": "user", "content": content}]


def _media_messages(
    prompt: str, n_images: int, offsets: Sequence[int] | None, n_videos: int, video_offsets: Sequence[int] | None
) -> list[dict[str, Any]]:
    """:func:`prompt_messages` of a prompt with videos: image and video parts cut into the text at their offsets."""
    media: list[tuple[int, int, str]] = []  # (offset, images before videos, kind)
    for kind, count, at in (("image", n_images, offsets), ("video", n_videos, video_offsets)):
        places = [0] * count if at is None else [int(o) for o in at]
        if len(places) != count or not offsets_place_images(places, len(prompt)):
            raise ValueError(
                f"{kind} offsets {places} do not place {count} {kind}(s) in a prompt of {len(prompt)} characters "
                f"(one non-decreasing offset in [0, len(prompt)] per {kind})"
            )
        media += [(o, 0 if kind == "image" else 1, kind) for o in places]
    content: list[dict[str, Any]] = []
    start = 0
    for at, _, kind in sorted(media, key=lambda m: (m[0], m[1])):  # stable: each kind keeps its order
        if at > start:
            content.append({"type": "text", "text": prompt[start:at]})
        content.append({"type": kind})
        start = at
    if start < len(prompt):
        content.append({"type": "text", "text": prompt[start:]})
    return [{"role": "user", "content": content}]


def _group_name(group: PreferenceGroup, index: int) -> str:
    return f"group {index}" + (f" (id={group.id!r})" if group.id is not None else "")


def build_group_batch(
    processor: Any,
    groups: Sequence[PreferenceGroup],
    max_length: int | None = None,
    response_suffix: str | None = None,
    response_fill: Mapping[str, int] | None = None,
    score_trailing_newline: bool = False,
    video_max_pixels: int | None = None,
) -> GroupBatch:
    """Tokenise groups into one right-padded batch of ``sum(K)`` sequences.

    Args:
        processor: A transformers multimodal processor with a chat template.
        groups: The groups; each must have at least one response.
        max_length: Maximum sequence length (prompt + image tokens + response). The
            response is truncated to fit; a ``ValueError`` names the group whose prompt
            alone does not leave room for one response token.
        response_suffix: ``None`` (default): each response is what the family's chat template
            writes for the assistant turn after the generation prompt, up to and including its
            end-of-turn token (see :meth:`~vpa_lightning.models.families.Family.response_text`),
            so prompt + response are the tokens of ``apply_chat_template([user, assistant],
            tokenize=True)``. A string: the raw response followed by this text instead (``""``: none).
        response_fill: Value of each per-token processor output (those shaped like
            ``input_ids``, other than ``input_ids``/``attention_mask``) over the response
            tokens, over the family's own (:attr:`~vpa_lightning.models.families.Family.response_fill`,
            e.g. PaliGemma's ``token_type_ids`` 1 = causal suffix); default 0 (= text token for
            ``mm_token_type_ids`` and Gemma-3-style ``token_type_ids``).
        score_trailing_newline: Also score what the template writes after the end-of-turn token
            (a newline for most templates, e.g. ``<|im_end|>\\n``), as TRL does. Off by default:
            generation stops at the end-of-turn token, so the newline is never produced.
        video_max_pixels: Pixels per video frame at most, given to the processor's own video size
            argument (:meth:`~vpa_lightning.models.families.Family.video_arguments`); ``None``: the
            processor's setting. Groups with videos need a family that takes video (else
            :class:`~vpa_lightning.errors.VideoUnsupportedError`).

    Returns:
        A :class:`GroupBatch`.
    """
    if not groups:
        raise ValueError("groups must not be empty")
    tokenizer = processor.tokenizer
    family = family_of(processor)
    suffix_ids = None
    if response_suffix is not None:
        suffix_ids = tokenizer(response_suffix, add_special_tokens=False)["input_ids"] if response_suffix else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    prompts: list[str] = []
    images: list[list[Any]] = []
    videos: list[list[Any]] = []
    responses: list[list[int]] = []
    owners: list[int] = []
    for g, group in enumerate(groups):
        if len(group.responses) < 1:
            raise ValueError(f"{_group_name(group, g)} has no responses")
        group_images = group.all_images
        group_videos = group.all_videos
        if group_videos:
            family.check_video(processor, f"{_group_name(group, g)} has {len(group_videos)} video(s)")
        messages = prompt_messages(group.prompt, len(group_images), group.image_offsets, len(group_videos), group.video_offsets)
        text = family.prompt_text(processor, messages)
        for r, response in enumerate(group.responses):
            if suffix_ids is None:  # the template's own assistant turn, end-of-turn token included
                ids = tokenizer(
                    family.response_text(processor, messages, text, response, score_trailing_newline),
                    add_special_tokens=False,
                )["input_ids"]
            else:
                ids = tokenizer(response, add_special_tokens=False)["input_ids"] + list(suffix_ids)
            if not ids:
                raise ValueError(f"{_group_name(group, g)}: response {r} is empty after tokenisation")
            prompts.append(text)
            images.append(group_images)
            videos.append(group_videos)
            responses.append(ids)
            owners.append(g)

    has_videos = any(videos)
    # a batch without videos calls the family exactly as before videos existed
    enc = family.encode(processor, prompts, images, **({"videos": videos, "video_max_pixels": video_max_pixels} if has_videos else {}))
    input_ids: Tensor = enc.pop("input_ids")
    attention_mask: Tensor = enc.pop("attention_mask")
    # per-token processor outputs (mm_token_type_ids, token_type_ids, ...) follow input_ids
    # per-token processor outputs follow input_ids: 2-D ones (mm_token_type_ids, token_type_ids, ...) get
    # the family's fill over the response, ones with more dimensions (Mllama's cross_attention_mask
    # [N, T, images, tiles]) repeat the last prompt token's value, as generation extends them
    per_token = {
        k: enc.pop(k)
        for k in list(enc)
        if isinstance(enc[k], Tensor) and enc[k].dim() >= 2 and enc[k].shape[:2] == input_ids.shape
    }
    fill = {k: int({**family.response_fill, **(response_fill or {})}.get(k, 0)) for k in per_token}
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")

    rows_ids, rows_tok, prompt_lengths, truncated = [], [], [], []
    for i, (ids, resp) in enumerate(zip(input_ids, responses)):
        keep = attention_mask[i].bool()  # prompt tokens, whatever the processor's padding side
        prompt_ids = ids[keep]
        n_prompt = prompt_ids.numel()
        room = len(resp) if max_length is None else max_length - n_prompt
        if room < 1:
            g = owners[i]
            what = "image and video tokens" if videos[i] else "image tokens"
            raise ValueError(
                f"{_group_name(groups[g], g)}: the prompt takes {n_prompt} tokens ({what} included, "
                f"which are never truncated) and leaves no room for the response within max_length={max_length}"
            )
        resp_ids = torch.tensor(resp[:room], dtype=ids.dtype)
        rows_ids.append(torch.cat([prompt_ids, resp_ids]))
        rows_tok.append({k: _extend_per_token(v[i][keep], resp_ids.numel(), fill[k]) for k, v in per_token.items()})
        prompt_lengths.append(n_prompt)
        truncated.append(room < len(resp))

    n, t = len(rows_ids), max(r.numel() for r in rows_ids)
    batch_ids = input_ids.new_full((n, t), pad_id)
    batch_mask = attention_mask.new_zeros((n, t))
    labels = input_ids.new_full((n, t), IGNORE_INDEX)
    batch_tok = {k: v.new_zeros((n, t, *v.shape[2:])) for k, v in per_token.items()}
    for i, row in enumerate(rows_ids):
        length = row.numel()
        batch_ids[i, :length] = row
        batch_mask[i, :length] = 1
        labels[i, prompt_lengths[i] : length] = row[prompt_lengths[i] :]
        for k, values in batch_tok.items():
            values[i, :length] = rows_tok[i][k]

    model_inputs = {"input_ids": batch_ids, "attention_mask": batch_mask, **batch_tok, **enc}
    image_counts = torch.tensor([len(row) for row in images], dtype=torch.long)
    video_counts = torch.tensor([len(row) for row in videos], dtype=torch.long) if has_videos else None
    return GroupBatch(
        model_inputs=model_inputs,
        labels=labels,
        group_index=torch.tensor(owners, dtype=torch.long),
        group_sizes=[len(g.responses) for g in groups],
        prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.long),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        image_counts=image_counts,
        pixel_rows=family.pixel_rows(processor, enc, input_ids, image_counts),
        image_inputs=tuple(k for k in family.image_inputs if k in enc),
        video_counts=video_counts,
        video_pixel_rows=family.video_pixel_rows(processor, enc, video_counts) if has_videos else None,
        video_inputs=tuple(k for k in family.video_inputs if k in enc) if has_videos else (),
    )


def _extend_per_token(prompt_values: Tensor, n_response: int, fill: int) -> Tensor:
    """A per-token input over prompt + response: ``fill`` for 2-D inputs, else the last prompt token's value."""
    if prompt_values.dim() == 1:
        tail = prompt_values.new_full((n_response,), fill)
    else:
        tail = prompt_values[-1:].expand(n_response, *prompt_values.shape[1:])
    return torch.cat([prompt_values, tail])


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_IMAGE_KWARGS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "batch_num_images")


def _picks(counts: Tensor, first: Tensor, owners: list[int]) -> list[int]:
    """For every entry of every row (row ``r`` owns ``counts[r]``), its index among the entries of
    the rows ``first`` (``first[g]`` is the first row of group ``g``; ``owners[r]`` is ``r``'s group)."""
    unique_counts = counts[first]
    starts = (torch.cumsum(unique_counts, 0) - unique_counts).tolist()
    sizes = counts.tolist()
    return [starts[g] + j for r, g in enumerate(owners) for j in range(sizes[r])]


@contextmanager
def encode_images_once(model: nn.Module, batch: GroupBatch) -> Iterator[None]:
    """Within this context, ``model``'s vision tower encodes each group's images (and videos) once.

    The rows of a group carry the same image inputs. The decoder-side ``*Model`` (e.g.
    ``LlavaModel``, ``Qwen2VLModel``, ``Idefics3Model``) gets an instance-level
    ``get_image_features`` that runs the original on the first row of every group (picked
    with :func:`select_rows`) and hands back its per-image features (``pooler_output``, one
    entry per row in transformers >= 5) repeated for each row, so the model's own checks and
    scattering of image features run unchanged; ``get_video_features`` likewise for a batch with
    videos (per-video features, Qwen2-VL). Features are shared tensors, so gradients of
    all K rows flow into the one vision pass. A model without ``get_image_features``, a batch
    with one row per group, or an output of another shape runs as usual.
    """
    inner = _unwrap_peft(model)
    base = getattr(inner, "model", None)
    index = batch.group_index
    wanted = [name for name, key in (("get_image_features", "pixel_values"), ("get_video_features", "pixel_values_videos"))
              if key in batch.model_inputs and getattr(base, name, None) is not None]
    if not wanted or index.numel() == 0:
        yield
        return
    groups, inverse = torch.unique(index, return_inverse=True)
    if groups.numel() == index.numel():
        yield
        return
    first = torch.full_like(groups, index.numel()).scatter_reduce(
        0, inverse, torch.arange(index.numel(), device=index.device), reduce="amin"
    )
    try:
        unique = select_rows(batch, first).model_inputs
    except ValueError:  # an input that is not per row: leave the batch as it is
        yield
        return
    owners = inverse.tolist()
    for name in wanted:
        if name == "get_image_features":
            counts = batch.image_counts if batch.image_counts is not None else torch.ones_like(index)
            once = _once_per_group(getattr(base, name), unique, _IMAGE_KWARGS, counts, batch.pixel_rows, first, owners,
                                   groups.numel(), family_of(model).pixel_values_per_row)
        else:
            counts = batch.video_counts if batch.video_counts is not None else torch.ones_like(index)
            once = _once_per_group(getattr(base, name), unique, _VIDEO_KWARGS, counts, batch.video_pixel_rows, first,
                                   owners, groups.numel(), False)
        setattr(base, name, once)  # instance attribute: shadows the method for this forward only
    try:
        yield
    finally:
        for name in wanted:
            delattr(base, name)


_VIDEO_KWARGS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def _once_per_group(original: Any, unique: Mapping[str, Any], kwarg_names: Sequence[str], counts: Tensor,
                    pixel_rows: Tensor | None, first: Tensor, owners: list[int], n_groups: int, per_row: bool) -> Any:
    """``original`` (``get_image_features`` / ``get_video_features``) run on each group's first row (``unique``'s
    inputs), its features handed back for every row (see :func:`encode_images_once`)."""
    # every image (and every pixel_values row) of the batch -> the same one among the first rows'
    image_picks = _picks(counts.cpu(), first.cpu(), owners)
    pixel_picks = _picks(pixel_rows.cpu(), first.cpu(), owners) if pixel_rows is not None else None
    n_unique_images = int(counts[first].sum())
    positional = [p.name for p in inspect.signature(original).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]

    def once(*args: Any, **kwargs: Any) -> Any:
        # all by keyword: the method's decorators fill config defaults by keyword
        call = {**dict(zip(positional, args)), **kwargs}
        for name in kwarg_names:
            if call.get(name) is not None and name in unique:
                call[name] = unique[name]
        out = original(**call)
        features = getattr(out, "pooler_output", None)
        if per_row:  # one entry per row with all its images (Idefics3 / SmolVLM)
            if not isinstance(features, (list, tuple)) or len(features) != n_groups:
                return original(*args, **kwargs)
            out.pooler_output = [features[g] for g in owners]
            return out
        if isinstance(features, (list, tuple)) and len(features) == n_unique_images:
            out.pooler_output = [features[i] for i in image_picks]  # one entry per image
        elif pixel_picks is not None and isinstance(features, Tensor) and features.shape[0] == len(set(pixel_picks)):
            out.pooler_output = features.index_select(0, torch.tensor(pixel_picks, device=features.device))  # per crop (InternVL)
        else:
            return original(*args, **kwargs)  # an unknown layout: encode every row
        # per-layer lists of per-image features (Qwen3-VL's deepstack_features) follow the same images
        for name, value in out.items():
            if name != "pooler_output" and isinstance(value, (list, tuple)) and value:
                if all(isinstance(v, (list, tuple)) and len(v) == n_unique_images for v in value):
                    out[name] = [[layer[i] for i in image_picks] for layer in value]
        return out

    return once


def _split_model(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(decoder returning last_hidden_state, LM head, final logit soft-cap) of a *ForConditionalGeneration."""
    inner = _unwrap_peft(model)
    base = getattr(inner, "model", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if base is None or head is None:
        raise NotImplementedError(
            f"{type(inner).__name__} has no `.model` decoder and output embeddings; "
            "cannot compute log-probs from hidden states"
        )
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text_config, "final_logit_softcapping", None) if family_of(inner).final_logit_softcap else None
    return base, head, cap


def group_logps(
    model: nn.Module,
    batch: GroupBatch,
    method: Literal["forward", "hidden"] = "forward",
    chunk_size: int = 256,
    share_prefix: bool = False,
    share_image: bool = True,
    pack: bool | str = False,
    pack_tokens: int | None = None,
    token_logps: bool = False,
    sq_probs: bool = False,
    pack_attention: str = "auto",
) -> GroupLogps:
    """Summed response log-probs of every row of ``batch`` with one forward pass of ``model``.

    Both methods evaluate the LM head only at the positions that predict a
    response token (never over image, prompt or padding positions) and take the
    log-softmax in float32. Gradients flow when called outside ``torch.no_grad()``.

    * ``"forward"`` (default): ``model(**inputs, logits_to_keep=mask)`` with a
      boolean ``[N, T]`` mask, which transformers >= 5 turns into flattened
      ``[M, vocab]`` logits for the ``M`` response-predicting positions. Goes
      through the model's own ``forward``, so family-specific logit processing and
      wrapper hooks (PEFT, FSDP, ``torch.compile``) apply as usual.
    * ``"hidden"``: run the decoder ``model.model`` only, gather its last hidden
      states at those positions and apply the LM head in chunks of ``chunk_size``
      rows: peak memory ``chunk_size x vocab`` instead of ``M x vocab``, in backward too
      (a plain linear head recomputes each chunk's logits there, see
      :mod:`~vpa_lightning.models.chunked_head`). Bypasses
      the top-level module's forward (a final-logit soft-cap in the text config is
      re-applied); prefer ``"forward"`` under FSDP unless the LM head is sharded with the decoder.

    Args:
        model: A transformers ``*ForConditionalGeneration`` VLM (optionally PEFT-wrapped).
        batch: Output of :func:`build_group_batch`, on the model's device.
        method: ``"forward"`` or ``"hidden"``, see above.
        chunk_size: Rows per LM-head chunk of the ``"hidden"`` method.
        share_prefix: Run each group's image + prompt once and its responses on top of the
            shared KV cache (see :func:`_prefix_shared_logps`); ``"forward"`` method only.
        share_image: Run the vision tower once per group, not once per row (see
            :func:`encode_images_once`); same results, K times less vision work.
        pack: ``True`` or ``"auto"`` (``"auto"``: fall back to the plain path, with one warning, for a
            batch or model it cannot pack, e.g. flash-attention-2, rows without a shared prompt). Packed shared-prefix groups (see :mod:`~vpa_lightning.models.packed`): each group's
            image + prompt once, its responses after it under a segment mask, several groups per row;
            one forward, so gradient checkpointing works. Either method.
        pack_tokens: Token budget of a packed row (``None``: the longest group's length).
        pack_attention: How packed segments are kept apart: ``"auto"`` (variable-length flash attention on
            CUDA where the family allows it, else the segment mask), ``"varlen"`` or ``"mask"`` (see
            :func:`~vpa_lightning.models.packed.packed_logps`).
        token_logps: Also return the per-token log-probs (``[N, R]``).
        sq_probs: Also return ``log_sum_sq_probs`` (one more log-softmax over the vocabulary).

    Returns:
        :class:`GroupLogps` with ``sum_logps`` (float32) and ``n_tokens``.
    """
    if pack:
        from vpa_lightning.models.packed import PackingUnsupported, packed_logps

        try:
            return packed_logps(model, batch, method=method, chunk_size=chunk_size, max_tokens=pack_tokens,
                                token_logps=token_logps, sq_probs=sq_probs, attention=pack_attention)
        except PackingUnsupported as exc:  # raised before any forward: nothing to undo
            if pack != "auto":
                raise
            _warn_once(f"packed groups not possible here ({exc}); using the plain path")
    if share_prefix:
        if method != "forward":
            raise ValueError("share_prefix works with method='forward' only")
        return _prefix_shared_logps(model, batch, token_logps=token_logps, sq_probs=sq_probs)
    labels = batch.labels
    # the token at position t is predicted at position t - 1
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # [N, T]
    rows = predicts.nonzero(as_tuple=True)[0]  # row-major, same order as boolean indexing
    targets = labels[:, 1:][predicts[:, :-1]]  # [M]

    if method == "forward":
        with encode_images_once(model, batch) if share_image else nullcontext():
            out = model(**batch.model_inputs, logits_to_keep=predicts, use_cache=False, return_dict=True)
        logits = out.logits
        if logits.dim() != 2 or logits.shape[0] != targets.numel():
            raise RuntimeError(
                f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a boolean "
                f"logits_to_keep selecting {targets.numel()} positions; use method='hidden'"
            )
        flat = -F.cross_entropy(logits.float(), targets, reduction="none")
        sq = _log_sum_sq(logits) if sq_probs else None
    elif method == "hidden":
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        base, head, cap = _split_model(model)
        with encode_images_once(model, batch) if share_image else nullcontext():
            hidden = base(**batch.model_inputs, use_cache=False, return_dict=True).last_hidden_state  # [N, T, H]
        if hidden.shape[:2] != labels.shape:
            raise RuntimeError(f"decoder output {tuple(hidden.shape[:2])} does not match labels {tuple(labels.shape)}")
        states = hidden[predicts]  # [M, H]
        flat = head_token_logps(head, states, targets, chunk_size, cap)  # no [M, vocab] kept for backward
        sq = None
        if sq_probs:  # WPO: no gradient, so chunk by chunk without keeping anything
            with torch.no_grad():
                sq_parts = []
                for start in range(0, targets.numel(), chunk_size):
                    chunk = head(states[start : start + chunk_size]).float()
                    sq_parts.append(_log_sum_sq(torch.tanh(chunk / cap) * cap if cap else chunk))
                sq = torch.cat(sq_parts) if sq_parts else flat.new_zeros(0)
    else:
        raise ValueError(f"method must be 'forward' or 'hidden', got {method!r}")

    n = labels.shape[0]
    sum_logps = torch.zeros(n, dtype=torch.float32, device=flat.device).index_add(0, rows, flat.float())
    n_tokens = torch.zeros(n, dtype=torch.long, device=labels.device).index_add(0, rows, torch.ones_like(rows))
    out = GroupLogps(
        sum_logps=sum_logps, n_tokens=n_tokens, group_index=batch.group_index, group_sizes=list(batch.group_sizes)
    )
    if token_logps:
        starts = torch.cumsum(n_tokens, 0) - n_tokens
        positions = torch.arange(rows.numel(), device=rows.device) - starts[rows]
        out.token_logps = _scatter_tokens(flat.float(), rows, positions, n, int(n_tokens.max()) if n else 0)
    if sq is not None:
        out.log_sum_sq_probs = torch.zeros(n, dtype=torch.float32, device=flat.device).index_add(0, rows, sq)
    return out


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import warnings

        warnings.warn(message, stacklevel=3)


def _log_sum_sq(logits: Tensor) -> Tensor:
    """``log sum_v p(v)^2`` per row of ``[M, V]`` logits, without gradient (WPO's weight alignment)."""
    with torch.no_grad():
        return torch.logsumexp(2.0 * F.log_softmax(logits.float(), dim=-1), dim=-1)


def _scatter_tokens(values: Tensor, rows: Tensor, positions: Tensor, n: int, width: int) -> Tensor:
    """``[n, width]`` zeros with ``values[m]`` at ``(rows[m], positions[m])`` (differentiable)."""
    out = values.new_zeros(n, max(width, 1))
    return out.index_put((rows, positions), values)


def cache_kwarg() -> str:
    """The forward's KV-cache argument: transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name
    still works there, with a warning); earlier 5.x releases (the GPU image's 5.24) know only the old one."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 25) else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a forward's output, under either name (see :func:`cache_kwarg`)."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _rope_index(model: nn.Module) -> Any:
    """The ``get_rope_index`` of an M-RoPE VLM (Qwen2-VL family), through any wrapper; else ``None``."""
    for module in model.modules():
        if hasattr(module, "get_rope_index") and hasattr(module, "rope_deltas"):
            return module.get_rope_index
    return None


def _expand_like(positions: Tensor, prefix_positions: Tensor) -> Tensor:
    """``[N, R]`` text positions in the layout of the prefix's (``[3, G, L]`` for M-RoPE)."""
    if prefix_positions.dim() == 3:
        return positions[None].expand(prefix_positions.shape[0], -1, -1)
    return positions


def _take_columns(values: Tensor, src: Tensor, valid: Tensor) -> Tensor:
    """``values[i, src[i, j], ...]`` where ``valid[i, j]``, else 0 (per-token inputs of any rank)."""
    extra = values.shape[2:]
    index = src.view(*src.shape, *(1,) * len(extra)).expand(*src.shape, *extra)
    taken = values.gather(1, index)
    return taken * valid.view(*valid.shape, *(1,) * len(extra)).to(taken.dtype)


def _prefix_shared_logps(
    model: nn.Module, batch: GroupBatch, token_logps: bool = False, sq_probs: bool = False
) -> GroupLogps:
    """:func:`group_logps` with the image + prompt prefix run once per group (``share_prefix=True``).

    1. One row per group holds the prompt (left-padded to the longest prompt, explicit positions),
       run with ``use_cache=True``: the vision tower and the prompt run once per group, and the
       logits at the last prompt position score every response's first token.
    2. The KV cache is indexed to one entry per response (``batch_select_indices``; gradients flow
       back through it into the prefix pass) and the responses run on top of it with positions
       continuing from their prompt, scoring the remaining tokens at response positions only.

    The result equals the plain path up to float rounding (tested per family). M-RoPE models
    (Qwen2-VL / Qwen2.5-VL) get their 3-D prompt positions from the model's own ``get_rope_index``;
    response tokens continue from the largest prompt position, as in the plain forward.
    """
    inputs = batch.model_inputs
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], batch.labels
    n, t = ids.shape
    device = ids.device
    sizes = torch.tensor(batch.group_sizes, device=device)
    first = torch.cumsum(sizes, 0) - sizes  # first row of each group (rows are grouped in order)
    owner = batch.group_index
    plen = batch.prompt_lengths.to(device)
    width = int(plen.max())
    cols = torch.arange(t, device=device)
    # rows of a group must share their prompt (true for build_group_batch output)
    prompt_of_owner = ids[first][owner]
    same = ((ids == prompt_of_owner) | (cols[None, :] >= plen[:, None])).all(dim=1) & (plen == plen[first][owner])
    if not bool(same.all()):
        raise ValueError("share_prefix: the rows of a group do not share one prompt")
    per_token = [
        k for k, v in inputs.items()
        if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[:2] == ids.shape and k != "attention_mask"
    ]  # includes Mllama's cross_attention_mask [N, T, images, tiles]: both passes need it
    start = family_of(model).first_position  # PaliGemma counts positions from 1

    # 1. prefix pass: prompt of each group, left-padded so every prompt ends at column width - 1
    g_len = plen[first]
    shift = width - g_len  # [G]
    src = cols[None, :width] - shift[:, None]  # source column of each prefix column
    valid = src >= 0
    src = src.clamp(min=0)
    prefix = {k: _take_columns(inputs[k][first], src, valid) for k in per_token}
    prefix_mask = valid.to(mask.dtype)
    image_inputs = {k: v for k, v in select_rows(batch, first).model_inputs.items() if k not in per_token and k != "attention_mask"}
    rope_index = _rope_index(model) if "image_grid_thw" in image_inputs or "video_grid_thw" in image_inputs else None
    if rope_index is not None:
        from vpa_lightning.models.packed import _rope_media

        position_ids, _ = rope_index(
            prefix["input_ids"], mm_token_type_ids=prefix.get("mm_token_type_ids"), attention_mask=prefix_mask,
            **_rope_media(image_inputs),
        )  # [3, G, width]
        # after the prompt's last token (every prompt ends at column width - 1), as in the plain forward
        next_position = position_ids[0, :, -1] + 1  # [G]
    else:
        position_ids = (prefix_mask.cumsum(-1) - 1).clamp(min=0) + start
        next_position = g_len + start
    out = model(
        **prefix, **image_inputs, attention_mask=prefix_mask, position_ids=position_ids,
        use_cache=True, logits_to_keep=1, return_dict=True,
    )
    first_logits = out.logits[:, -1].float()  # [G, V]: predicts each response's first token
    cache = output_cache(out)
    cache.batch_select_indices(owner)

    # 2. response pass on top of the per-response cache
    n_resp = (labels != IGNORE_INDEX).sum(dim=1)  # response tokens per row
    r_width = int(n_resp.max())
    r_cols = torch.arange(r_width, device=device)
    r_valid = r_cols[None, :] < n_resp[:, None]
    r_src = (plen[:, None] + r_cols[None, :]).clamp(max=t - 1)
    resp = {k: _take_columns(inputs[k], r_src, r_valid) for k in per_token}
    resp_ids = resp["input_ids"]
    # index_select: indexing with repeated rows has a backward with parallel float atomics on CPU (not reproducible)
    first_lp = -F.cross_entropy(first_logits.index_select(0, owner), resp_ids[:, 0], reduction="none")  # [N]
    sum_logps = first_lp
    sq = _log_sum_sq(first_logits)[owner] if sq_probs else None
    tokens = _scatter_tokens(first_lp, torch.arange(n, device=device), torch.zeros(n, dtype=torch.long, device=device), n, r_width) if token_logps else None
    keep = r_valid.clone()
    keep[:, -1] = False
    keep[:, :-1] &= r_valid[:, 1:]  # position j scores token j + 1
    if bool(keep.any()):
        out2 = model(
            **resp,
            attention_mask=torch.cat([prefix_mask[owner], r_valid.to(mask.dtype)], dim=1),
            position_ids=_expand_like(next_position[owner][:, None] + r_cols[None, :], position_ids),
            **{cache_kwarg(): cache}, use_cache=True, logits_to_keep=keep, return_dict=True,
        )
        targets = resp_ids[:, 1:][keep[:, :-1]]
        flat = -F.cross_entropy(out2.logits.float(), targets, reduction="none")
        rows, cols_kept = keep.nonzero(as_tuple=True)
        sum_logps = sum_logps.index_add(0, rows, flat)
        if tokens is not None:
            tokens = tokens.index_put((rows, cols_kept + 1), flat)
        if sq is not None:
            sq = sq.index_add(0, rows, _log_sum_sq(out2.logits))
    return GroupLogps(
        sum_logps=sum_logps, n_tokens=n_resp, group_index=owner, group_sizes=list(batch.group_sizes),
        token_logps=tokens, log_sum_sq_probs=sq,
    )


def batch_to_device(inputs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a mapping to ``device``."""
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
