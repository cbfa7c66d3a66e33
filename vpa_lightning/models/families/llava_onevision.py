"""LLaVA-OneVision: ``batch_num_images`` counts the images of each prompt that has any (a single image
gets "anyres" patches, several get the base view only); it is recomputed with a 0 for text-only
prompts so that it has one entry per row, like the other per-row inputs (same patching)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Family


class LlavaOnevisionFamily(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    processor_classes = ("LlavaOnevisionProcessor",)

    def encode(self, processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]], **kwargs: Any) -> dict[str, Any]:
        import torch

        out = super().encode(processor, prompts, images, **kwargs)
        if "batch_num_images" in out:
            out["batch_num_images"] = torch.tensor([len(r) for r in images], dtype=out["batch_num_images"].dtype)
        return out


FAMILY = LlavaOnevisionFamily()
