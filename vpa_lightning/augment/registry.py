"""Name-based construction (for YAML configs) and the corruption helper used by mDPO / SeVa."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Augmentation, Compose, Identity, check_images, resolve_seed, seeded_rng
from .diffusion import DiffusionNoise
from .kornia_ops import (
    ColorJitter,
    GaussianBlur,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomPosterize,
    RandomResizedCrop,
    RandomRotation,
    RandomSolarize,
)
from .presets import byol, moco_v2, simclr

__all__ = [
    "AUGMENTATIONS",
    "AugmentationSpec",
    "build_augmentation",
    "corrupt_images",
    "register_augmentation",
]

#: Name -> factory (class or preset function) returning an :class:`Augmentation`.
AUGMENTATIONS: dict[str, Callable[..., Augmentation]] = {
    "none": Identity,
    "diffusion_noise": DiffusionNoise,
    "random_resized_crop": RandomResizedCrop,
    "horizontal_flip": RandomHorizontalFlip,
    "color_jitter": ColorJitter,
    "grayscale": RandomGrayscale,
    "gaussian_blur": GaussianBlur,
    "rotation": RandomRotation,
    "posterize": RandomPosterize,
    "solarize": RandomSolarize,
    "moco_v2": moco_v2,
    "simclr": simclr,
    "byol": byol,
}

#: What :func:`build_augmentation` accepts: a name, ``{"name": ..., **kwargs}``, a module, or a list.
AugmentationSpec = str | Mapping[str, Any] | Augmentation | Sequence[Any] | None


def register_augmentation(name: str, factory: Callable[..., Augmentation]) -> None:
    """Make ``factory`` selectable as ``name`` in :func:`build_augmentation`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in AUGMENTATIONS:
        raise ValueError(f"name {name!r} is already registered")
    AUGMENTATIONS[name] = factory


def build_augmentation(spec: AugmentationSpec) -> Augmentation:
    """Build an augmentation from a config value.

    Accepted forms (YAML-friendly)::

        augmentation: diffusion_noise                 # a registered name
        augmentation: {name: diffusion_noise, step: 800}   # name + constructor arguments
        augmentation: [random_resized_crop, {name: color_jitter, p: 0.8}]  # composed in order
        augmentation: null                            # no augmentation (same as "none")

    An :class:`Augmentation` instance is returned as is. Names are listed in
    :data:`AUGMENTATIONS`.

    Args:
        spec: The name, mapping, module, list of those, or ``None``.

    Returns:
        An :class:`Augmentation` (a :class:`Compose` for a list).
    """
    if spec is None:
        return Identity()
    if isinstance(spec, Augmentation):
        return spec
    if isinstance(spec, str):
        return _factory(spec)()
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"augmentation mapping needs a string 'name' key, got {spec!r}")
        try:
            return _factory(name)(**kwargs)
        except TypeError as exc:
            raise ValueError(f"bad arguments for augmentation {name!r}: {exc}") from exc
    if isinstance(spec, Sequence):
        return Compose([build_augmentation(item) for item in spec])
    raise ValueError(f"augmentation must be a name, mapping, Augmentation or list, got {type(spec).__name__}")


def _factory(name: str) -> Callable[..., Augmentation]:
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        known = ", ".join(sorted(AUGMENTATIONS))
        raise ValueError(f"unknown augmentation name {name!r}; known: {known}") from None


def corrupt_images(
    images: Tensor,
    augmentation: AugmentationSpec,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Return a corrupted copy of ``images`` (SeVa's rejected-side image, mDPO's :math:`m'`).

    Runs without autograd; ``images`` is not modified.

    Args:
        images: Float tensor ``[B, C, H, W]``: ``[0, 1]`` pixels, or normalised pixels
            ``(x - mean) / std`` when ``mean`` and ``std`` are given (e.g. a HF processor's
            ``pixel_values``).
        augmentation: An :class:`Augmentation` or anything :func:`build_augmentation` accepts.
        seed: Make the corruption reproducible (see :class:`Augmentation`).
        generator: Alternatively, draw the seed from this generator.
        mean: Per-channel normalisation mean. With ``std``, stages that need ``[0, 1]`` input
            (colour ops, rotation) run on denormalised pixels, and the result is renormalised;
            stages that work on any range (diffusion noise, blur, crop, flip) run on the
            normalised tensor, as SeVa applies diffusion noise to ``pixel_values``.
        std: Per-channel normalisation standard deviation (all > 0).

    Returns:
        The corrupted batch, same shape, dtype and device as ``images``.
    """
    check_images(images)
    aug = build_augmentation(augmentation)
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")
    seed = resolve_seed(seed, generator)
    with torch.no_grad(), seeded_rng(seed, images.device):
        if mean is None:
            out = aug.augment(images)
        else:
            m, s = _channel_stats(images, mean, std)
            out, normalised = images, True
            for leaf in aug.leaves():
                if leaf.unit_range and normalised:
                    out, normalised = out * s + m, False
                elif isinstance(leaf, DiffusionNoise) and not normalised:
                    out, normalised = (out - m) / s, True
                out = leaf.augment(out)
            if not normalised:
                out = (out - m) / s
    return out.to(dtype=images.dtype)


def _channel_stats(images: Tensor, mean: Any, std: Any) -> tuple[Tensor, Tensor]:
    channels = images.shape[1]
    tensors = []
    for name, value in (("mean", mean), ("std", std)):
        t = torch.as_tensor(value, dtype=images.dtype, device=images.device).flatten()
        if t.numel() == 1:
            t = t.expand(channels)
        if t.numel() != channels:
            raise ValueError(f"{name} must have 1 or C={channels} values, got {t.numel()}")
        tensors.append(t.view(1, channels, 1, 1))
    if not bool((tensors[1] > 0).all()):
        raise ValueError("std must be > 0 in every channel")
    return tensors[0], tensors[1]
