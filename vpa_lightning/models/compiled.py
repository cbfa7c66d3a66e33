"""Regional compilation: each transformer block compiled with ``torch.compile``, the rest of the model eager.

What a block runs besides its matrix products (RMSNorm's float32 upcast and rescale, rotary embeddings, SiLU x up,
residual adds, LoRA's scale-and-add) is a string of memory-bound kernels; inductor fuses them. Compiling the blocks
rather than the whole model keeps the compile short (identical blocks share one compiled graph: a 32-layer model
compiles about one layer's worth) and leaves the parts that change from batch to batch (packing, the log-prob head,
the loss) eager. The blocks are compiled with dynamic shapes, so a packed row's new length every step does not
recompile: after the first step (policy, then reference with the adapters disabled: a graph each) nothing compiles
again (tested on CPU with lengths that change every step). The variable-length attention of packed groups runs
eager inside the compiled blocks (:func:`vpa_lightning.models.varlen.varlen_attention` is excluded from
compilation: a flash kernel, nothing to fuse, and its layout's sizes change every step).

``nn.Module.compile`` compiles in place: parameter names, ``state_dict`` keys and checkpoints are unchanged.
"""

from __future__ import annotations

from torch import nn

__all__ = ["compile_blocks", "transformer_blocks"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its decoder layers and the vision tower's encoder layers):
    the modules transformers makes checkpointable (``GradientCheckpointingLayer``), outermost only."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and id(module) not in inside:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def compile_blocks(model: nn.Module) -> int:
    """Compile every block of :func:`transformer_blocks` in place (dynamic shapes); returns how many. A model
    without such blocks is left as it is (0)."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
