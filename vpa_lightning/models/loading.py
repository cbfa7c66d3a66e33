"""Loading a VLM and its processor: ``tiny:<family>`` test models or a transformers checkpoint.

The processor and the weights load apart (:func:`load_processor`, :func:`load_model`), so that
:class:`~vpa_lightning.module.VisionDPOModule` can take the processor at construction and create
the weights in ``configure_model``, inside the strategy's sharding context (DeepSpeed ZeRO-3's
``zero.Init``, FSDP's wrap context).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "TINY_PREFIX", "load_model", "load_processor", "load_vlm"]

TINY_PREFIX = "tiny:"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} or None, got {dtype!r}")


def load_processor(model_name_or_path: str) -> Any:
    """The processor of ``model_name_or_path`` alone: no weights are allocated (a ``tiny:`` model is
    built on the meta device only to get its processor)."""
    if model_name_or_path.startswith(TINY_PREFIX):
        from vpa_lightning.models.tiny import build_tiny_vlm

        with torch.device("meta"):
            _, processor = build_tiny_vlm(model_name_or_path[len(TINY_PREFIX) :])
        return processor
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_name_or_path)


def load_model(model_name_or_path: str, seed: int = 0, dtype: str | None = None) -> nn.Module:
    """The model of ``model_name_or_path`` (see :func:`load_vlm`), without its processor."""
    _check_dtype(dtype)
    if model_name_or_path.startswith(TINY_PREFIX):
        from vpa_lightning.models.tiny import build_tiny_vlm

        model, _ = build_tiny_vlm(model_name_or_path[len(TINY_PREFIX) :], seed=seed)
        if dtype not in (None, "auto"):
            model.to(getattr(torch, dtype))
        return model
    from transformers import AutoModelForImageTextToText

    kwargs = {} if dtype is None else {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    return AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs)


def load_vlm(model_name_or_path: str, seed: int = 0, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """``(model, processor)``: ``tiny:<family>`` builds a tiny random VLM (size options as in
    ``tiny:llava?image_size=56&vision_hidden=64``, see :func:`vpa_lightning.models.tiny.parse_tiny_spec`), anything else is loaded
    with ``AutoModelForImageTextToText`` / ``AutoProcessor`` (a local folder or a hub id already in the cache).

    ``dtype``: ``None`` (transformers' default, float32), ``"auto"`` (the checkpoint's dtype) or
    ``"float32"`` / ``"bfloat16"`` / ``"float16"``.
    """
    _check_dtype(dtype)
    if model_name_or_path.startswith(TINY_PREFIX):
        from vpa_lightning.models.tiny import build_tiny_vlm

        model, processor = build_tiny_vlm(model_name_or_path[len(TINY_PREFIX) :], seed=seed)
        if dtype not in (None, "auto"):
            model.to(getattr(torch, dtype))
        return model, processor
    return load_model(model_name_or_path, seed=seed, dtype=dtype), load_processor(model_name_or_path)
