"""Batched, seeded image augmentations for SeVa-style self-generated preference pairs.

SeVa (arXiv 2404.10501) pairs the policy's answer on the original image (chosen) with its answer
on an augmented image (rejected); mDPO needs a corrupted image for its image-conditional term.
This package provides:

* :class:`DiffusionNoise` (pure torch) and Kornia-backed :class:`RandomResizedCrop`,
  :class:`RandomHorizontalFlip`, :class:`ColorJitter`, :class:`RandomGrayscale`,
  :class:`GaussianBlur`, :class:`RandomRotation`, :class:`RandomPosterize`,
  :class:`RandomSolarize` - each an ``nn.Module`` on ``[B, C, H, W]`` float tensors that runs on
  the images' device and keeps shape, dtype and device;
* :class:`Compose` and the presets :func:`moco_v2`, :func:`simclr`, :func:`byol`;
* :func:`build_augmentation` (names / lists from YAML), :func:`corrupt_images` (``[B, C, H, W]``)
  and :func:`corrupt_pixel_values` (any processor output: LLaVA, Idefics3 crops, Qwen2-VL patches).

Seeding: ``aug(images, seed=123)`` (or ``generator=g``) forks torch's RNG, seeds it, and restores
it afterwards, so equal seeds give equal outputs. Importing this package does not import Kornia;
Kornia is imported when a Kornia-backed augmentation is constructed.
"""

from .base import Augmentation, Compose, Identity
from .diffusion import DiffusionNoise, sigmoid_beta_schedule
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
from .pixels import corrupt_pixel_values
from .presets import byol, moco_v2, simclr
from .registry import AUGMENTATIONS, build_augmentation, corrupt_images, register_augmentation

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "ColorJitter",
    "Compose",
    "DiffusionNoise",
    "GaussianBlur",
    "Identity",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "RandomPosterize",
    "RandomResizedCrop",
    "RandomRotation",
    "RandomSolarize",
    "build_augmentation",
    "byol",
    "corrupt_images",
    "corrupt_pixel_values",
    "moco_v2",
    "register_augmentation",
    "sigmoid_beta_schedule",
    "simclr",
]
