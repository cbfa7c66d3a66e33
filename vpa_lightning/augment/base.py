"""Base class, seeding and composition for batched image augmentations.

Every augmentation is a :class:`torch.nn.Module` that maps a float tensor ``[B, C, H, W]`` to a
tensor of the same shape, dtype and device, on the images' device. Randomness comes from torch's
global RNG of the images' device (and the CPU RNG, where Kornia samples its parameters); passing
``seed`` (or a :class:`torch.Generator` to draw a seed from) forks that RNG state with
:func:`torch.random.fork_rng`, seeds it, runs the augmentation and restores the previous state, so
a seeded call is reproducible and leaves the global RNG untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Augmentation", "Compose", "Identity", "check_images", "seeded_rng"]

_MAX_SEED = 2**63 - 1


def check_images(images: Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a floating-point ``[B, C, H, W]`` tensor."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}")


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int | None:
    """The seed to use for one call: ``seed`` itself, one drawn from ``generator``, or ``None``."""
    if seed is not None and generator is not None:
        raise ValueError("seed and generator are mutually exclusive; pass at most one")
    if generator is not None:
        return int(torch.randint(_MAX_SEED, (1,), generator=generator, device=generator.device).item())
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return seed


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Fork the CPU RNG (and ``device``'s RNG) and seed it with ``seed``; no-op when ``seed`` is None.

    Only the CPU generator and the generator of ``device`` are seeded and later restored; the RNG
    of other accelerators is untouched.
    """
    if seed is None:
        yield
        return
    device = torch.device(device)
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        index = device.index if device.index is not None else _current_index(device.type)
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    with fork:
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        elif device.type != "cpu":
            torch.manual_seed(seed)
        yield


def _current_index(device_type: str) -> int:
    module = getattr(torch, device_type, None)
    if module is not None and hasattr(module, "current_device"):
        return int(module.current_device())
    return 0


class Augmentation(nn.Module):
    """Base class: a batched, device-agnostic, optionally seeded image augmentation.

    Subclasses implement :meth:`augment`. Call the module as ``aug(images, seed=...)``.

    Class attribute ``unit_range`` tells whether the augmentation expects pixel values in
    ``[0, 1]`` (colour operations, rotation with black padding) or works on any range (noise,
    blur, crop, flip: linear maps that commute with per-channel normalisation).
    :func:`vpa_lightning.augment.corrupt_images` uses it to denormalise only where needed.
    """

    unit_range: ClassVar[bool] = True

    def augment(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Augment ``images`` using torch's global RNG. Subclasses override this."""
        raise NotImplementedError

    def forward(
        self,
        images: Tensor,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Augment a batch.

        Args:
            images: Float tensor ``[B, C, H, W]``; ``[0, 1]`` RGB for colour augmentations.
            seed: If given, the call is reproducible: the same seed gives the same output, and the
                global RNG state is restored afterwards.
            generator: Alternatively, a :class:`torch.Generator` from which one seed is drawn per
                call (reproducible streams across calls without touching the global RNG).

        Returns:
            The augmented batch, same shape, dtype and device as ``images``.
        """
        check_images(images)
        seed = resolve_seed(seed, generator)
        with seeded_rng(seed, images.device):
            out = self.augment(images)
        return out.to(dtype=images.dtype)

    def leaves(self) -> list[Augmentation]:
        """The primitive augmentations this module applies, in order (itself for a primitive)."""
        return [self]


class Identity(Augmentation):
    """No augmentation; returns the input unchanged (registry name ``none``)."""

    unit_range: ClassVar[bool] = False

    def augment(self, images: Tensor) -> Tensor:
        return images

    def leaves(self) -> list[Augmentation]:
        return []


class Compose(Augmentation):
    """Apply augmentations one after another, sharing one RNG fork when seeded.

    Args:
        augmentations: The augmentations to apply, in order. Each must be an
            :class:`Augmentation` (build them from names with
            :func:`vpa_lightning.augment.build_augmentation`).
    """

    def __init__(self, augmentations: Sequence[Augmentation]) -> None:
        super().__init__()
        if isinstance(augmentations, nn.Module) or not isinstance(augmentations, Sequence):
            raise ValueError("augmentations must be a sequence of Augmentation modules")
        for i, aug in enumerate(augmentations):
            if not isinstance(aug, Augmentation):
                raise ValueError(f"augmentations[{i}] must be an Augmentation, got {type(aug).__name__}")
        self.augmentations = nn.ModuleList(augmentations)

    def augment(self, images: Tensor) -> Tensor:
        for aug in self.augmentations:
            images = aug.augment(images)
        return images

    def leaves(self) -> list[Augmentation]:
        out: list[Augmentation] = []
        for aug in self.augmentations:
            out.extend(aug.leaves())
        return out

    def __len__(self) -> int:
        return len(self.augmentations)

    def __getitem__(self, index: int) -> Augmentation:
        return self.augmentations[index]
