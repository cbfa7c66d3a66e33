"""Which modules of a VLM are its language model and its vision side, and LoRA on the language model."""

from __future__ import annotations

import re
import warnings

from torch import nn

__all__ = ["apply_lora", "default_lora_targets", "language_and_vision_modules"]


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def language_and_vision_modules(model: nn.Module) -> tuple[str, list[str]]:
    """``(language model name, [vision tower / projector names])`` of a transformers VLM.

    The language model is ``model.get_decoder()``; every other child of the
    inner ``model.model`` (vision tower, projector/connector) counts as vision.
    """
    decoder = model.get_decoder()
    lm_name = _module_name(model, decoder)
    parent_name = lm_name.rsplit(".", 1)[0] if "." in lm_name else ""
    parent = model.get_submodule(parent_name) if parent_name else model
    vision = [
        f"{parent_name}.{n}" if parent_name else n
        for n, child in parent.named_children()
        if child is not decoder and any(True for _ in child.parameters())
    ]
    return lm_name, vision


def default_lora_targets(model: nn.Module) -> str:
    """A PEFT ``target_modules`` regex matching the ``nn.Linear`` layers of the language model only."""
    lm_name, _ = language_and_vision_modules(model)
    leaves = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.get_submodule(lm_name).named_modules() if isinstance(m, nn.Linear)}
    )
    if not leaves:
        raise ValueError(f"no nn.Linear layers in {lm_name}; set lora_target_modules")
    return rf"^{re.escape(lm_name)}\..*\.({'|'.join(map(re.escape, leaves))})$"


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | list[str] | None = None,
    freeze_vision: bool = True,
) -> nn.Module:
    """``model`` wrapped in PEFT LoRA adapters (default targets: :func:`default_lora_targets`).

    With ``freeze_vision=False`` the vision tower and projector are trained fully as PEFT
    ``modules_to_save`` (their originals stay available for the reference, adapters disabled).
    """
    from peft import LoraConfig, get_peft_model

    _, vision = language_and_vision_modules(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or default_lora_targets(model),
        modules_to_save=None if freeze_vision else [v.rsplit(".", 1)[-1] for v in vision],
    )
    # Under DeepSpeed ZeRO-3 (parameters partitioned as created, in zero.Init's dtype) the adapters keep that
    # dtype: PEFT's float32 upcast of bf16 adapters leaves ZeRO-3 with trainable partitions of two dtypes, which
    # its optimizer refuses (it keeps float32 master weights of its own).
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias: nothing a user can change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config, autocast_adapter_dtype=not zero3)
