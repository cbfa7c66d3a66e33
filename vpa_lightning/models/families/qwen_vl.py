"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``pixel_values`` are flat patches, ``image_grid_thw`` (t, h, w)
per image gives each image's count; M-RoPE positions come from the model's ``get_rope_index``.

Video (Qwen2-VL, Qwen2.5-VL): a ``{"type": "video"}`` part renders as ``<|vision_start|><|video_pad|>
<|vision_end|>``; the processor gets the decoded frames as arrays with their ``VideoMetadata`` and
``do_sample_frames=False`` and gives ``pixel_values_videos`` (flat patches) and ``video_grid_thw`` per video
(Qwen2.5-VL also ``second_per_grid_ts``, from the sampled frame rate: its temporal positions are spaced in
seconds); ``get_rope_index`` then gives the video tokens their temporal positions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import Family


class QwenVLFamily(Family):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    processor_classes = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")
    # Qwen3-VL writes each frame's timestamp into the text and takes another rope index: not wired yet
    video_model_types = ("qwen2_vl", "qwen2_5_vl")
    video_processor_classes = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")

    def pixel_rows_per_image(self, processor: Any, inputs: Mapping[str, Any], input_ids: Any, image_counts: Any) -> Any:
        return inputs["image_grid_thw"].prod(dim=-1)

    def video_arguments(self, processor: Any, videos: Sequence[Any], max_pixels: int | None) -> dict[str, Any]:
        video_processor = processor.video_processor
        kwargs: dict[str, Any] = {"do_sample_frames": False, "video_metadata": [v.metadata() for v in videos]}
        if hasattr(video_processor, "cap_pixels_per_frame"):
            # the frames are sampled and capped by vpa (video_max_frames, video_max_pixels): no second budget
            kwargs["cap_pixels_per_frame"] = False
        if max_pixels is not None:
            size = dict(video_processor.size)
            kwargs["size"] = {"shortest_edge": min(int(size.get("shortest_edge") or max_pixels), max_pixels),
                              "longest_edge": max_pixels}
        return {"videos": [v.frames for v in videos], "videos_kwargs": kwargs}


FAMILY = QwenVLFamily()
