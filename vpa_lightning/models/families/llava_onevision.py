"""LLaVA-OneVision: ``batch_num_images`` counts the images of each prompt that has any (a single image
gets "anyres" patches, several get the base view only); it is recomputed with a 0 for text-only
prompts so that it has one entry per row, like the other per-row inputs (same patching).

Video: a ``{"type": "video"}`` part renders as ``<video>`` (the template puts a turn's images, then its videos,
then its text, wherever the prompt had them); the processor gets the decoded frames, sampling off, resizes each
frame to its fixed size and gives ``pixel_values_videos`` ``[videos, frames, 3, H, W]``: one tensor, so the videos
of a batch must have one frame count (a batch that mixes counts raises): every video is therefore decoded to exactly
``video_max_frames`` frames (:attr:`videos_one_tensor`, :meth:`Family.video_sampling`). ``video_max_pixels`` bounds the
decoded frames only: the processor's fixed frame size is the checkpoint's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Family


class LlavaOnevisionFamily(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    processor_classes = ("LlavaOnevisionProcessor",)
    video_model_types = ("llava_onevision",)
    video_processor_classes = ("LlavaOnevisionProcessor",)
    videos_one_tensor = True

    def encode(self, processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]], **kwargs: Any) -> dict[str, Any]:
        import torch

        out = super().encode(processor, prompts, images, **kwargs)
        if "batch_num_images" in out:
            out["batch_num_images"] = torch.tensor([len(r) for r in images], dtype=out["batch_num_images"].dtype)
        return out


FAMILY = LlavaOnevisionFamily()
