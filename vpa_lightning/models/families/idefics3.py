"""Idefics3 and SmolVLM: the processors take one list of images per text."""

from __future__ import annotations

from .base import Family


class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    processor_classes = ("Idefics3Processor", "SmolVLMProcessor")
    nested_images = True
    pixel_values_per_row = True


FAMILY = Idefics3Family()
