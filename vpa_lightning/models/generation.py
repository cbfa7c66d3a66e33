"""Batched greedy generation shared by SeVa pair generation and evaluation.

Prompts go through the processor's chat template (the images, then the question, or each image where
its offset places it in the question), left-padded so
every row of a batch ends at the same position and ``generate`` appends after it.

A prompt may also hold videos (:class:`~vpa_lightning.models.video.VideoClip`, decoded frames) for a family that
takes video (:meth:`~vpa_lightning.models.families.Family.takes_video`: Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video),
each where its offset places it, as in training; any other family raises
:class:`~vpa_lightning.errors.VideoUnsupportedError` naming the model types that take video.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vpa_lightning.models.families import family_of
from vpa_lightning.models.logps import prompt_messages

__all__ = ["chat_prompt", "encode_for_generation", "generate_answers", "greedy_generate", "shared_prefix_next_logits",
           "to_model"]


def chat_prompt(
    processor: Any, question: str, n_images: int = 1, offsets: Sequence[int] | None = None,
    n_videos: int = 0, video_offsets: Sequence[int] | None = None,
) -> str:
    """The chat-template text of one user turn holding ``n_images`` images, ``n_videos`` videos and ``question``:
    the images (then the videos) first, or with ``offsets`` / ``video_offsets`` each where it sits in the question
    (as in training, see :func:`~vpa_lightning.models.logps.prompt_messages`)."""
    messages = prompt_messages(question, n_images, offsets, n_videos, video_offsets)
    return family_of(processor).prompt_text(processor, messages)  # the template, or PaliGemma's fixed format


def _image_list(image: Any) -> list[Any]:
    """One item of ``images``: an image, a list of images (several, or ``[]`` / ``None`` for none)."""
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def encode_for_generation(
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    offsets: Sequence[Sequence[int] | None] | None = None,
    *,
    videos: Sequence[Any] | None = None,
    video_offsets: Sequence[Sequence[int] | None] | None = None,
    video_max_pixels: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded processor inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) of a batch.

    ``images[i]`` is the image of ``questions[i]``, or a list of its images (``[]`` for a text-only question);
    ``offsets[i]`` where each sits in the question (``None``: images first; see :func:`chat_prompt`).
    ``videos[i]``: the question's :class:`~vpa_lightning.models.video.VideoClip`, a list of them, or ``None`` /
    ``[]`` for none; ``video_offsets[i]`` where each sits (``None``: before the text, after the images);
    ``video_max_pixels``: pixels per frame at most, given to the processor's video size argument (``None``: its
    own). A batch with videos adds the family's video inputs (``pixel_values_videos``, ``video_grid_thw``, ...);
    a family without video input raises :class:`~vpa_lightning.errors.VideoUnsupportedError`.
    """
    family = family_of(processor)
    rows = [_image_list(im) for im in images]
    clips = [_image_list(v) for v in videos] if videos is not None else [[] for _ in rows]
    if len(clips) != len(rows):
        raise ValueError(f"{len(clips)} video entries for {len(rows)} questions")
    if any(clips):
        family.check_video(processor, f"a generation prompt has {sum(map(len, clips))} video(s)",
                           "Generate with one of them, or prompts without videos")
    tok = getattr(processor, "tokenizer", processor)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        where = list(offsets) if offsets is not None else [None] * len(rows)
        video_where = list(video_offsets) if video_offsets is not None else [None] * len(rows)
        texts = [chat_prompt(processor, q, len(r), at, len(v), vat)
                 for q, r, at, v, vat in zip(questions, rows, where, clips, video_where)]
        # a batch without videos calls the family exactly as before videos existed
        extra = {"videos": clips, "video_max_pixels": video_max_pixels} if any(clips) else {}
        return family.encode(processor, texts, rows, **extra)  # nesting per family, no second BOS
    finally:
        tok.padding_side = old_side


def to_model(value: Any, key: str, param: torch.Tensor) -> Any:
    """An encoded input on the model's device; pixel inputs (``pixel_values``, ``pixel_values_videos``) in its
    dtype too (the processor gives float32)."""
    if not torch.is_tensor(value):
        return value
    if key.startswith("pixel_values") and value.is_floating_point():
        return value.to(param.device, dtype=param.dtype)
    return value.to(param.device)


# per-token inputs the shared-prefix path rebuilds for the suffixes; any other (PaliGemma's and Gemma 3's
# token_type_ids: bidirectional prompt blocks; Mllama's cross_attention_mask) sends the rows down the whole path
_PER_TOKEN_KNOWN = {"input_ids", "attention_mask", "mm_token_type_ids"}
_MEDIA_TOKEN_NAMES = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        first = rows[0][i]
        if any(r[i] != first for r in rows[1:]):
            return i
    return n


@torch.no_grad()
def shared_prefix_next_logits(model: Any, processor: Any, texts: Sequence[str], one: dict[str, Any]) -> torch.Tensor | None:
    """Next-token logits ``[len(texts), vocab]`` after each of ``texts`` (chat-template prompts about the same media),
    with the tokens they share, the media among them, run once: one row over the shared prefix fills a KV cache, which
    every row's own tokens then extend (left-padded, so each row's last token is the last column). ``one``: the
    processor's encoding of ``texts[0]`` with its media (one row, on the model's device).

    A judge asks about one prompt's image or video once per answer and aspect; the image or video tokens are most of
    each row, so this runs them once instead of once a row. Returns ``None`` (the caller runs every row whole) for
    fewer than 2 rows, rows whose shared tokens do not hold every media token, or a model with per-token inputs this
    does not rebuild (``token_type_ids``: PaliGemma's bidirectional prompt, Gemma 3's image blocks; Mllama's
    ``cross_attention_mask``). M-RoPE models (Qwen2-VL family) take their prefix positions from their own
    ``get_rope_index``; the suffix continues after the prefix's largest position, as in a whole forward."""
    from vpa_lightning.models.logps import _rope_index, cache_kwarg, output_cache
    from vpa_lightning.models.packed import _rope_media

    tok = getattr(processor, "tokenizer", processor)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if len(ids) < 2:
        return None
    shared = min(_common_prefix(ids), min(len(r) for r in ids) - 1)  # every row keeps one token of its own
    full = one["input_ids"]
    if full.shape[0] != 1 or not bool(one.get("attention_mask", torch.ones_like(full)).all()):
        return None
    e0, u0 = full[0].tolist(), ids[0]
    tail = len(u0) - shared
    if shared <= 0 or len(e0) < len(u0) or e0[len(e0) - tail:] != u0[shared:]:
        return None  # the media were not expanded inside the shared tokens (or the tokenizer splits otherwise)
    config = getattr(model, "config", None)
    media_tokens = {getattr(config, n) for n in _MEDIA_TOKEN_NAMES if isinstance(getattr(config, n, None), int)}
    if any(t in media_tokens for r in ids for t in r[shared:]):
        return None
    per_token = {k for k, v in one.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == full.shape}
    if per_token - _PER_TOKEN_KNOWN:
        return None
    width = len(e0) - tail  # the shared tokens after the media's expansion
    device = full.device
    prefix = {k: one[k][:, :width] for k in per_token}
    prefix["attention_mask"] = torch.ones((1, width), dtype=torch.long, device=device)
    media = {k: v for k, v in one.items() if k not in per_token}
    rope_index = _rope_index(model) if "image_grid_thw" in media or "video_grid_thw" in media else None
    if rope_index is not None:
        positions, _ = rope_index(prefix["input_ids"], mm_token_type_ids=prefix.get("mm_token_type_ids"),
                                  attention_mask=prefix["attention_mask"], **_rope_media(media))  # [3, 1, width]
        after = int(positions[0, 0, -1]) + 1
    else:
        start = family_of(model).first_position
        positions = torch.arange(width, device=device)[None] + start
        after = width + start
    out = model(**prefix, **media, position_ids=positions, use_cache=True, logits_to_keep=1, return_dict=True)
    cache = output_cache(out)
    n = len(ids)
    cache.batch_select_indices(torch.zeros(n, dtype=torch.long, device=device))
    own = [r[shared:] for r in ids]
    cols = max(len(r) for r in own)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    suffix = torch.full((n, cols), pad, dtype=full.dtype, device=device)
    valid = torch.zeros((n, cols), dtype=torch.long, device=device)
    for i, r in enumerate(own):
        suffix[i, cols - len(r):] = torch.tensor(r, dtype=full.dtype, device=device)
        valid[i, cols - len(r):] = 1
    lengths = valid.sum(dim=1, keepdim=True)
    step = (torch.arange(cols, device=device)[None] - (cols - lengths)).clamp(min=0)  # 0 at each row's first own token
    suffix_positions = after + step
    if rope_index is not None:
        suffix_positions = suffix_positions[None].expand(positions.shape[0], -1, -1)
    extra = {k: torch.zeros((n, cols), dtype=one[k].dtype, device=device)
             for k in per_token - {"input_ids", "attention_mask"}}  # text tokens: type 0
    out = model(input_ids=suffix, attention_mask=torch.cat([torch.ones((n, width), dtype=torch.long, device=device), valid], 1),
                position_ids=suffix_positions, use_cache=True, logits_to_keep=1, return_dict=True,
                **{cache_kwarg(): cache}, **extra)
    return out.logits[:, -1]


@torch.no_grad()
def greedy_generate(model: Any, processor: Any, inputs: dict[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy answers (special tokens removed, stripped) for encoded ``inputs``."""
    param = next(model.parameters())
    moved = {k: to_model(v, k, param) for k, v in inputs.items()}
    tok = getattr(processor, "tokenizer", processor)
    out = model.generate(**moved, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    new = out[:, moved["input_ids"].shape[1] :]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def generate_answers(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    offsets: Sequence[Sequence[int] | None] | None = None,
    videos: Sequence[Any] | None = None,
    video_offsets: Sequence[Sequence[int] | None] | None = None,
    video_max_pixels: int | None = None,
) -> list[str]:
    """Greedy answers to ``questions[i]`` about ``images[i]`` (a PIL image, or a list of 0..N), ``batch_size`` at a
    time; ``offsets[i]``: where each image sits in the question (``None``: images first). ``videos[i]``: the
    question's videos (a :class:`~vpa_lightning.models.video.VideoClip` or a list of 0..N; ``None``: none), at
    ``video_offsets[i]``, for families that take video (see :func:`encode_for_generation`)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if videos is not None and len(videos) != len(questions):
        raise ValueError(f"{len(videos)} video entries but {len(questions)} questions")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            end = start + batch_size
            inputs = encode_for_generation(
                processor, images[start:end], questions[start:end], None if offsets is None else offsets[start:end],
                videos=None if videos is None else videos[start:end],
                video_offsets=None if video_offsets is None else video_offsets[start:end],
                video_max_pixels=video_max_pixels,
            )
            answers.extend(greedy_generate(model, processor, inputs, max_new_tokens))
    finally:
        model.train(was_training)
    return answers
