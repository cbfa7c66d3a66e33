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

__all__ = ["chat_prompt", "encode_for_generation", "generate_answers", "greedy_generate", "to_model"]


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
