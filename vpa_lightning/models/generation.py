"""Batched greedy generation shared by SeVa pair generation and evaluation.

Prompts go through the processor's chat template (the images, then the question, or each image where
its offset places it in the question), left-padded so
every row of a batch ends at the same position and ``generate`` appends after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vpa_lightning.models.families import family_of
from vpa_lightning.models.logps import prompt_messages

__all__ = ["chat_prompt", "encode_for_generation", "generate_answers", "greedy_generate"]


def chat_prompt(processor: Any, question: str, n_images: int = 1, offsets: Sequence[int] | None = None) -> str:
    """The chat-template text of one user turn holding ``n_images`` images and ``question``: the
    images first, or with ``offsets`` each where it sits in the question (as in training, see
    :func:`~vpa_lightning.models.logps.prompt_messages`)."""
    messages = prompt_messages(question, n_images, offsets)
    return family_of(processor).prompt_text(processor, messages)  # the template, or PaliGemma's fixed format


def _image_list(image: Any) -> list[Any]:
    """One item of ``images``: an image, a list of images (several, or ``[]`` / ``None`` for none)."""
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def encode_for_generation(
    processor: Any, images: Sequence[Any], questions: Sequence[str], offsets: Sequence[Sequence[int] | None] | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded processor inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) of a batch.

    ``images[i]`` is the image of ``questions[i]``, or a list of its images (``[]`` for a text-only question);
    ``offsets[i]`` where each sits in the question (``None``: images first; see :func:`chat_prompt`).
    """
    tok = getattr(processor, "tokenizer", processor)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        rows = [_image_list(im) for im in images]
        where = list(offsets) if offsets is not None else [None] * len(rows)
        texts = [chat_prompt(processor, q, len(r), at) for q, r, at in zip(questions, rows, where)]
        return family_of(processor).encode(processor, texts, rows)  # nesting per family, no second BOS
    finally:
        tok.padding_side = old_side


@torch.no_grad()
def greedy_generate(model: Any, processor: Any, inputs: dict[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy answers (special tokens removed, stripped) for encoded ``inputs``."""
    param = next(model.parameters())
    moved = {
        k: (v.to(param.device, dtype=param.dtype) if k == "pixel_values" else v.to(param.device))
        if torch.is_tensor(v)
        else v
        for k, v in inputs.items()
    }
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
) -> list[str]:
    """Greedy answers to ``questions[i]`` about ``images[i]`` (a PIL image, or a list of 0..N), ``batch_size`` at a
    time; ``offsets[i]``: where each image sits in the question (``None``: images first)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = None if offsets is None else offsets[start : start + batch_size]
            inputs = encode_for_generation(processor, images[start : start + batch_size], questions[start : start + batch_size], chunk)
            answers.extend(greedy_generate(model, processor, inputs, max_new_tokens))
    finally:
        model.train(was_training)
    return answers
