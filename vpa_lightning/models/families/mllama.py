"""Mllama (Llama 3.2 Vision): images are nested per text; ``cross_attention_mask`` ``[N, T, images,
tiles]`` is per token, so it is extended over the response like every per-token input with extra
dimensions (the response attends to the image as the prompt's last token does).

A batch cannot mix text-only and image prompts: once one row has an image, Mllama's cross-attention
layers run for every row, and a row with no image then attends uniformly to padding image states
(its mask row is all zero, not -inf), so it would score differently than alone; the processor
cannot batch them either. Such a batch raises a ``ValueError`` (the data module then trains the
groups that fit together and skips the rest with a counted reason).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Family


class MllamaFamily(Family):
    name = "mllama"
    model_types = ("mllama",)
    processor_classes = ("MllamaProcessor",)
    nested_images = True
    pixel_values_per_row = True

    def encode(self, processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]], **kwargs: Any) -> dict[str, Any]:
        with_images = sum(1 for r in images if len(r))
        if 0 < with_images < len(images):
            raise ValueError(
                "Mllama cannot batch text-only prompts with image prompts (its cross-attention layers would "
                "attend to padding images for the text-only rows): keep them in separate batches"
            )
        return super().encode(processor, prompts, images, **kwargs)


FAMILY = MllamaFamily()
