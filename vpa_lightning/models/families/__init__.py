"""Per-family quirks of transformers VLMs, one module per family in this package.

Everything family-specific that the trainer needs (how a processor wants its images, the value of
per-token processor outputs over the response, processor outputs that are not model inputs, a
prompt format for checkpoints without a chat template, ...) is an attribute or method of a
:class:`Family` subclass. Each module of this package defines ``FAMILY``, an instance, and is found
by :func:`families` (no list to edit): adding a family is adding one module here. Families are
matched by processor class name (the data side only has the processor) or by the model's
``config.model_type``; anything else gets the generic :class:`Family`, which fits every
processor that follows transformers' conventions.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Any

from .base import Family

__all__ = ["Family", "families", "family_of", "video_model_types"]


@lru_cache(maxsize=1)
def families() -> tuple[Family, ...]:
    """Every registered family (the ``FAMILY`` of each module of this package)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            found.append(family)
    return tuple(found)


_GENERIC = Family()


def family_of(obj: Any) -> Family:
    """The :class:`Family` of a processor, a model (PEFT-wrapped or not) or a ``model_type`` string."""
    if isinstance(obj, str):
        return next((f for f in families() if obj in f.model_types), _GENERIC)
    inner = obj.get_base_model() if hasattr(obj, "get_base_model") else obj
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        return family_of(model_type)
    names = {k.__name__ for k in type(obj).__mro__}
    return next((f for f in families() if names & set(f.processor_classes)), _GENERIC)


def video_model_types() -> list[str]:
    """The ``model_type`` s that take video input (for messages and the README)."""
    return [t for f in families() for t in f.video_model_types]
