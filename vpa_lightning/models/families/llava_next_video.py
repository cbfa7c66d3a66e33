"""LLaVA-NeXT-Video: images as LLaVA-NeXT (anyres crops, ``image_sizes`` per image, one ``pixel_values`` entry per
image); videos as extra placeholder tokens in the prompt.

Video: a ``{"type": "video"}`` part renders as ``<video>\\n`` (the published Vicuna template puts a turn's images, then
its videos, then its text); the processor gets the decoded frames, sampling off, resizes each frame's shortest edge to
its ``size`` and centre-crops it to its ``crop_size`` (the vision tower's square input), and gives
``pixel_values_videos`` ``[videos, frames, 3, H, W]``, one entry per video. Each frame's patch grid is average-pooled
(``spatial_pool_stride``), so a video is ``frames x (H / patch / stride) ** 2`` ``<video>`` tokens, ordinary placeholder
tokens in the prompt: vision once per group, prefix sharing and packing treat them like images. One tensor for the
batch: its videos need one frame count (a batch that mixes counts raises), so every video is decoded to exactly
``video_max_frames`` frames (:attr:`videos_one_tensor`). ``video_max_pixels`` bounds the decoded frames
only: the frame size the model sees is the checkpoint's ``crop_size`` (its CLIP tower has fixed position embeddings)."""

from __future__ import annotations

from .base import Family


class LlavaNextVideoFamily(Family):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    processor_classes = ("LlavaNextVideoProcessor",)
    video_model_types = ("llava_next_video",)
    video_processor_classes = ("LlavaNextVideoProcessor",)
    videos_one_tensor = True


FAMILY = LlavaNextVideoFamily()
