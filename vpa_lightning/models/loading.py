"""Loading a VLM and its processor: ``tiny:<family>`` test models or a transformers checkpoint.

The processor and the weights load apart (:func:`load_processor`, :func:`load_model`), so that
:class:`~vpa_lightning.module.VisionDPOModule` can take the processor at construction and create
the weights in ``configure_model``, inside the strategy's sharding context (DeepSpeed ZeRO-3's
``zero.Init``, FSDP's wrap context). Under FSDP with several processes only rank 0 reads the weights:
the other ranks build the same modules on the meta device (``load_model(..., empty=True)``), check
their layout against rank 0's (:func:`match_rank0_layout`) and get rank 0's tensors when FSDP wraps
them (``sync_module_states=True`` with :class:`EmptyParamInit` as ``param_init_fn``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "TINY_PREFIX", "EmptyParamInit", "enable_activation_checkpointing", "load_model", "load_processor", "load_vlm", "match_rank0_layout", "share_parameters"]

TINY_PREFIX = "tiny:"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant), by the name transformers 5 gives it
    (``gradient_checkpointing_enable`` is a deprecated alias there that warns on every run)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} or None, got {dtype!r}")


def _tiny(model_name_or_path: str, seed: int = 0, dtype: str | None = None, empty: bool = False) -> tuple[nn.Module, Any]:
    """``(model, processor)`` of a ``tiny:`` spec, cast to ``dtype``; ``empty``: on the meta device."""
    from vpa_lightning.models.tiny import build_tiny_vlm

    with torch.device("meta") if empty else nullcontext():
        model, processor = build_tiny_vlm(model_name_or_path[len(TINY_PREFIX) :], seed=seed)
        if dtype not in (None, "auto"):
            model.to(getattr(torch, dtype))
    return model, processor


def load_processor(model_name_or_path: str) -> Any:
    """The processor of ``model_name_or_path`` alone: no weights are allocated (a ``tiny:`` model is
    built on the meta device only to get its processor)."""
    if model_name_or_path.startswith(TINY_PREFIX):
        return _tiny(model_name_or_path, empty=True)[1]
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_name_or_path)


def load_model(model_name_or_path: str, seed: int = 0, dtype: str | None = None, empty: bool = False) -> nn.Module:
    """The model of ``model_name_or_path`` (see :func:`load_vlm`), without its processor.

    ``empty=True``: the same architecture on the meta device, no weights read or allocated (a checkpoint
    is built from its config with ``AutoModelForImageTextToText.from_config``, as ``from_pretrained``
    builds it before loading): for FSDP ranks that receive rank 0's weights when the module is wrapped.
    """
    _check_dtype(dtype)
    if model_name_or_path.startswith(TINY_PREFIX):
        return _tiny(model_name_or_path, seed, dtype, empty)[0]
    from transformers import AutoConfig, AutoModelForImageTextToText

    if empty:  # from_config takes the config's dtype, what from_pretrained's "auto" (its default) reads first
        kwargs = {} if dtype in (None, "auto") else {"dtype": getattr(torch, dtype)}
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_name_or_path), **kwargs)
    kwargs = {} if dtype is None else {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    return AutoModelForImageTextToText.from_pretrained(model_name_or_path, **kwargs)


class EmptyParamInit:
    """FSDP ``param_init_fn`` for modules built on the meta device: gives each module's own meta
    parameters and buffers uninitialised storage on ``device``, and nothing else. FSDP's
    ``sync_module_states=True`` then overwrites them with rank 0's values (non-persistent buffers such as
    rotary ``inv_freq`` included), so the random ``reset_parameters()`` that FSDP's default would run is
    skipped. Unlike ``Module.to_empty``, a tensor shared by two modules (tied embeddings) stays shared,
    as it is on rank 0, where FSDP flattens it once."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._done: Any = None

    def __call__(self, module: nn.Module) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        if self._done is None:  # meta tensor -> its replacement, until no module holds the meta tensor
            self._done = WeakIdKeyDictionary()
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                new = self._done.get(tensor)
                if new is None:
                    new = torch.empty_like(tensor, device=self.device)
                    if isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    self._done[tensor] = new
                store[name] = new

    def __getstate__(self) -> dict[str, Any]:  # picklable with the strategy's kwargs
        return {"device": self.device, "_done": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.device)!r})"


def share_parameters(empty: nn.Module, source: nn.Module) -> None:
    """Give ``empty`` (built on the meta device) ``source``'s parameter tensors, without copying (frozen
    ``Parameter`` objects of its own over the same storage; ties kept) and copies of its buffers. The
    two architectures must be the same."""
    if [(n, t.shape, t.dtype) for n, t in _named(empty)] != [(n, t.shape, t.dtype) for n, t in _named(source)]:
        raise ValueError(f"cannot share the weights of {type(source).__name__} with a differently built module")

    def given(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(source.get_parameter(name).detach(), requires_grad=False)
        return source.get_buffer(name).detach().clone()

    _replace_tensors(empty, given)


def _replace_tensors(model: nn.Module, new_for: Any) -> None:
    """Replace each parameter and buffer of ``model`` by ``new_for(name, tensor)`` (``None`` keeps it).
    A tensor held under several names (tied weights) is asked for once, under its first name, and its
    replacement takes every place, so ties stay tied."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # id -> (old, new): the old kept alive, so no id is reused
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) not in done:
                    done[id(tensor)] = (tensor, new_for(f"{prefix}.{name}" if prefix else name, tensor))
                new = done[id(tensor)][1]
                if new is not None:
                    store[name] = new


def _named(model: nn.Module):
    return (*model.named_parameters(), *model.named_buffers())


def _layout(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    # a tied tensor once, under its first name
    return [(name, tuple(t.shape), t.dtype) for name, t in _named(model)]


def match_rank0_layout(model: nn.Module | None, what: str, error: BaseException | None = None) -> None:
    """Collective over the default process group, called by every rank after building ``model`` (or
    failing to: ``model=None`` and the ``error``): rank 0 (the real weights) sends each parameter's and
    buffer's name, shape and dtype. A rank that failed, or whose module has other names or shapes, makes
    every rank raise, naming the rank and the failure or first difference, instead of leaving the others
    waiting in a collective or letting FSDP's broadcast pour rank 0's tensors into the wrong ones; a dtype
    that differs (a checkpoint without a dtype in its config: ``from_pretrained`` takes the weights'
    dtype, ``from_config`` the default) is cast to rank 0's on the meta device."""
    import torch.distributed as dist

    rank = dist.get_rank()
    ours = None if model is None else _layout(model)
    box = [ours if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    theirs = box[0]
    problem = None
    if error is not None or model is None:
        problem = f"rank {rank}: building the {what} failed: {error!r}"
    elif theirs is None:
        pass  # rank 0 failed: its own message says why
    elif [(n, s) for n, s, _ in ours] != [(n, s) for n, s, _ in theirs]:
        diff = next(
            (f"{a[0]} {list(a[1])} here vs {b[0]} {list(b[1])} on rank 0" for a, b in zip(ours, theirs) if a[:2] != b[:2]),
            f"{len(ours)} tensors here vs {len(theirs)} on rank 0",
        )
        problem = f"rank {rank}: the {what} built on the meta device differs from rank 0's: {diff}"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if any(problems):
        hint = "" if error is not None or theirs is None else " (set --model.fsdp_rank0_load false to load on every rank)"
        raise RuntimeError("; ".join(p for p in problems if p) + hint) from error
    wanted = {name: dtype for name, _, dtype in theirs}

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        dtype = wanted.get(name, tensor.dtype)
        if tensor.dtype == dtype:
            return None
        new = tensor.to(dtype)
        return nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new

    _replace_tensors(model, cast)


def load_vlm(model_name_or_path: str, seed: int = 0, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """``(model, processor)``: ``tiny:<family>`` builds a tiny random VLM (size options as in
    ``tiny:llava?image_size=56&vision_hidden=64``, see :func:`vpa_lightning.models.tiny.parse_tiny_spec`), anything else is loaded
    with ``AutoModelForImageTextToText`` / ``AutoProcessor`` (a local folder or a hub id already in the cache).

    ``dtype``: ``None`` (transformers' default, float32), ``"auto"`` (the checkpoint's dtype) or
    ``"float32"`` / ``"bfloat16"`` / ``"float16"``.
    """
    _check_dtype(dtype)
    if model_name_or_path.startswith(TINY_PREFIX):
        return _tiny(model_name_or_path, seed, dtype)
    return load_model(model_name_or_path, seed=seed, dtype=dtype), load_processor(model_name_or_path)
