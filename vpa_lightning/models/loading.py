"""Loading a VLM and its processor: ``tiny:<family>`` test models or a transformers checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "TINY_PREFIX", "load_vlm"]

TINY_PREFIX = "tiny:"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_vlm(model_name_or_path: str, seed: int = 0, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """``(model, processor)``: ``tiny:<family>`` builds a tiny random VLM (size options as in
    ``tiny:llava?image_size=56&vision_hidden=64``, see :func:`vpa_lightning.models.tiny.parse_tiny_spec`), anything else is loaded
    with ``AutoModelForImageTextToText`` / ``AutoProcessor`` (a local folder or a hub id already in the cache).

    ``dtype``: ``None`` (transformers' default, float32), ``"auto"`` (the checkpoint's dtype) or
    ``"float32"`` / ``"bfloat16"`` / ``"float16"``.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} or None, got {dtype!r}")
    if model_name_or_path.startswith(TINY_PREFIX):
        from vpa_lightning.models.tiny import build_tiny_vlm

        model, processor = build_tiny_vlm(model_name_or_path[len(TINY_PREFIX) :], seed=seed)
        if dtype not in (None, "auto"):
            model.to(getattr(torch, dtype))
        return model, processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {} if dtype is None else {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(model_name_or_path)
    return model, processor
