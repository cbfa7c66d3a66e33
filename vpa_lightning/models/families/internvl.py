"""InternVL: an image becomes several crops (tiles + thumbnail), each a row of ``pixel_values`` with
``image_seq_length`` context tokens; the crops of an image are counted from its tokens."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family


class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    processor_classes = ("InternVLProcessor",)

    def pixel_rows_per_image(self, processor: Any, inputs: Mapping[str, Any], input_ids: Any, image_counts: Any) -> Any:
        import torch

        # each image is <img> + context tokens (image_seq_length per crop) + </img>
        starts = (input_ids == processor.start_image_token_id).nonzero().tolist()
        context = (input_ids == processor.image_token_id).long()
        crops = []
        for row, col in starts:
            end = int((input_ids[row, col:] == processor.end_image_token_id).nonzero()[0]) + col
            crops.append(int(context[row, col:end].sum()) // processor.image_seq_length)
        return torch.tensor(crops, dtype=torch.long)


FAMILY = InternVLFamily()
