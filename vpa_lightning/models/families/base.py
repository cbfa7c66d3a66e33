"""The :class:`Family` base: the generic behaviour, which subclasses override per family."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Family"]


class Family:
    """Quirks of one VLM family; the base class is the generic behaviour.

    Attributes:
        name: Short name (used in messages and the README's table).
        model_types: ``config.model_type`` values of the family's models.
        processor_classes: Class names of the family's processors.
        response_fill: Value of each 2-D per-token processor output (shaped like
            ``input_ids``) over response tokens; default 0 (a text token for
            ``mm_token_type_ids`` and Gemma-3-style ``token_type_ids``).
        dropped_inputs: Processor outputs that are not model inputs (never passed to the model).
        nested_images: The processor takes one list of images per text, even for one image.
    """

    name: str = "generic"
    model_types: tuple[str, ...] = ()
    processor_classes: tuple[str, ...] = ()
    response_fill: Mapping[str, int] = {}
    dropped_inputs: tuple[str, ...] = ()
    nested_images: bool = False

    def images_argument(self, images: list[list[Any]]) -> Any:
        """The ``images=`` argument of the processor for one list of images per text."""
        if self.nested_images or any(len(row) != 1 for row in images):
            return images
        return [row[0] for row in images]

    def __repr__(self) -> str:
        return f"<Family {self.name}>"
