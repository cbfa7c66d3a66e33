"""Export a trained :class:`~vpa_lightning.module.VisionDPOModule` to Hugging Face formats.

Command line::

    python -m vpa_lightning.export CKPT OUT            # OUT/adapter only
    python -m vpa_lightning.export CKPT OUT --merged   # OUT/adapter and OUT/merged

``CKPT`` is a Lightning checkpoint written by ``vpa fit`` (``.ckpt`` file; a
DeepSpeed checkpoint *directory* is first converted with Lightning's
``convert_zero_checkpoint_to_fp32_state_dict``, which needs ``deepspeed``).
The frozen base model is rebuilt from the checkpoint's ``model_name_or_path``
(as ``VisionDPOModule.load_from_checkpoint`` does), so that path must be loadable.

What is written:

* ``OUT/adapter/`` (LoRA modules only): the PEFT adapter (``PeftModel.save_pretrained``:
  ``adapter_config.json`` + ``adapter_model.safetensors``; with ``freeze_vision=False`` the
  fully trained vision modules are in it as ``modules_to_save``) and the processor. Load with
  ``PeftModel.from_pretrained(base_model, "OUT/adapter")``.
* ``OUT/merged/`` (with ``merged=True``, and always for a full fine-tune): the adapters merged
  into the base weights (``merge_and_unload()``), saved with ``save_pretrained`` together with the
  processor, so plain ``AutoModelForImageTextToText.from_pretrained("OUT/merged")`` and
  ``AutoProcessor.from_pretrained("OUT/merged")`` load it; no PEFT needed.

From Python, ``export(module_or_checkpoint, out_dir, merged=True)`` does the same; an in-memory
module is not modified (the merge runs on a CPU copy).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vpa_lightning.module import VisionDPOModule

__all__ = ["export", "load_module", "main"]

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def load_module(checkpoint_path: str | os.PathLike[str], map_location: str = "cpu") -> VisionDPOModule:
    """``VisionDPOModule`` from a Lightning checkpoint file (or a DeepSpeed checkpoint directory)."""
    from vpa_lightning.module import VisionDPOModule

    path = Path(checkpoint_path)
    with warnings.catch_warnings():
        # LoRA checkpoints hold only the trainable weights by design (see VisionDPOModule.on_save_checkpoint)
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = _load(VisionDPOModule, path, map_location)
    return module.eval()


def _load(cls: Any, path: Path, map_location: str) -> Any:
    if path.is_dir():  # DeepSpeed (ZeRO) checkpoint: consolidate it into one fp32 file first
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )

        with tempfile.TemporaryDirectory() as tmp:
            single = Path(tmp) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
            return cls.load_from_checkpoint(str(single), map_location=map_location, weights_only=True)
    # weights_only: a checkpoint is data; unpickling it must never run code, whatever torch's default
    return cls.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)


def export(
    checkpoint_path_or_module: str | os.PathLike[str] | VisionDPOModule,
    out_dir: str | os.PathLike[str],
    merged: bool = False,
    safe_serialization: bool = True,
) -> dict[str, Path]:
    """Write the LoRA adapter (PEFT format) and optionally the merged model, each with the processor.

    Args:
        checkpoint_path_or_module: A ``VisionDPOModule`` or the path of a checkpoint of one.
        out_dir: Output directory; gets ``adapter/`` and, with ``merged``, ``merged/``.
        merged: Also write the adapters merged into the base weights (a plain transformers model).
        safe_serialization: Write ``.safetensors`` (else PyTorch ``.bin``).

    Returns:
        ``{"adapter": path, "merged": path}`` for what was written. A module trained without LoRA
        has no adapter: only ``merged/`` (its full weights) is written, whatever ``merged`` says.
    """
    from peft import PeftModel

    if isinstance(checkpoint_path_or_module, (str, os.PathLike)):
        module, owned = load_module(checkpoint_path_or_module), True
    else:
        module, owned = checkpoint_path_or_module, False
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = module.processor
    written: dict[str, Path] = {}

    model = module.model
    if isinstance(model, PeftModel):
        adapter_dir = out / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir), safe_serialization=safe_serialization)
        _save_processor(processor, adapter_dir)
        written["adapter"] = adapter_dir
        if not merged:
            return written
        # merge_and_unload rewrites the model in place: work on a CPU copy unless we own the module
        peft_model = model if owned else _cpu_copy(model)
        plain = peft_model.merge_and_unload()
    else:
        plain = model if owned else _cpu_copy(model)

    merged_dir = out / MERGED_DIR
    plain.save_pretrained(str(merged_dir), safe_serialization=safe_serialization)
    _save_processor(processor, merged_dir)
    written["merged"] = merged_dir
    return written


def _cpu_copy(model: Any) -> Any:
    import torch

    devices = {p.device for p in model.parameters()}
    if devices <= {torch.device("cpu")}:
        return copy.deepcopy(model)
    # copy via CPU so an accelerator does not need room for a second copy
    original = next(iter(devices))
    model.to("cpu")
    try:
        return copy.deepcopy(model)
    finally:
        model.to(original)


def _save_processor(processor: Any, directory: Path) -> None:
    if processor is not None:
        processor.save_pretrained(str(directory))


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``python -m vpa_lightning.export CKPT OUT [--merged]``."""
    parser = argparse.ArgumentParser(
        prog="python -m vpa_lightning.export",
        description="Export a VisionDPOModule checkpoint: the LoRA adapter in PEFT format (OUT/adapter) and, "
        "with --merged, the adapters merged into the base model (OUT/merged), each with the processor.",
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) written by `vpa fit`, or a DeepSpeed checkpoint directory")
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--merged", action="store_true", help="also write the merged model (loadable without PEFT)")
    parser.add_argument("--no-safetensors", action="store_true", help="write PyTorch .bin files instead of .safetensors")
    args = parser.parse_args(argv)
    written = export(args.checkpoint, args.out_dir, merged=args.merged, safe_serialization=not args.no_safetensors)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written


if __name__ == "__main__":
    main()
