"""Mllama (Llama 3.2 Vision): images are nested per text; ``cross_attention_mask`` ``[N, T, images,
tiles]`` is per token, so it is extended over the response like every per-token input with extra
dimensions (the response attends to the image as the prompt's last token does)."""

from __future__ import annotations

from .base import Family


class MllamaFamily(Family):
    name = "mllama"
    model_types = ("mllama",)
    processor_classes = ("MllamaProcessor",)
    nested_images = True
    pixel_values_per_row = True


FAMILY = MllamaFamily()
