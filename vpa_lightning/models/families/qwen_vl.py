"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``pixel_values`` are flat patches, ``image_grid_thw`` (t, h, w)
per image gives each image's count; M-RoPE positions come from the model's ``get_rope_index``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family


class QwenVLFamily(Family):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    processor_classes = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")

    def pixel_rows_per_image(self, processor: Any, inputs: Mapping[str, Any], input_ids: Any, image_counts: Any) -> Any:
        return inputs["image_grid_thw"].prod(dim=-1)


FAMILY = QwenVLFamily()
