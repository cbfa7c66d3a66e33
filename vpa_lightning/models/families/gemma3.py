"""Gemma 3: the processor takes one list of images per text; turns end with ``<end_of_turn>``
(not EOS), which :meth:`Family.response_text` reads off the template."""

from __future__ import annotations

from .base import Family


class Gemma3Family(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    processor_classes = ("Gemma3Processor",)
    unused_vision_modules = ("head",)  # SigLIP's attention pooling: the VLM takes its hidden states
    bidirectional_blocks = "image"
    nested_images = True
    final_logit_softcap = False


FAMILY = Gemma3Family()
