"""PaliGemma: a prefix-LM; its processor also returns ``labels``, which are not a per-token input."""

from __future__ import annotations

from .base import Family


class PaliGemmaFamily(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    processor_classes = ("PaliGemmaProcessor",)
    # token_type_ids: 0 = prefix (image + prompt, bidirectional), 1 = suffix (causal): responses are suffix
    response_fill = {"token_type_ids": 1}
    dropped_inputs = ("labels",)


FAMILY = PaliGemmaFamily()
