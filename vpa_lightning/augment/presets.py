"""Published self-supervised augmentation pipelines, as :class:`Compose` modules.

Parameters follow the papers' reference code; the crop keeps the input size unless ``size`` is
given, and the blur kernel defaults to ~10% of the shorter side (SimCLR, BYOL; MoCo v2's PIL blur
has no fixed kernel).
"""

from __future__ import annotations

from .base import Compose
from .kornia_ops import (
    ColorJitter,
    GaussianBlur,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
    RandomSolarize,
)

__all__ = ["byol", "moco_v2", "simclr"]


def moco_v2(size: int | tuple[int, int] | None = None) -> Compose:
    """MoCo v2 (Chen et al. 2020, arXiv 2003.04297) augmentation.

    RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
    RandomGrayscale(p=0.2), GaussianBlur(sigma in [0.1, 2]) with p=0.5, horizontal flip p=0.5.

    Args:
        size: Output size of the crop; ``None`` keeps the input size.
    """
    return Compose(
        [
            RandomResizedCrop(size=size, scale=(0.2, 1.0)),
            ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            RandomGrayscale(p=0.2),
            GaussianBlur(sigma=(0.1, 2.0), p=0.5),
            RandomHorizontalFlip(p=0.5),
        ]
    )


def simclr(size: int | tuple[int, int] | None = None, strength: float = 1.0) -> Compose:
    """SimCLR (Chen et al. 2020, arXiv 2002.05709, appendix A) augmentation.

    RandomResizedCrop(scale=(0.08, 1)), horizontal flip p=0.5,
    ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p=0.8, RandomGrayscale(p=0.2),
    GaussianBlur(sigma in [0.1, 2], kernel 10% of the side) with p=0.5.

    Args:
        size: Output size of the crop; ``None`` keeps the input size.
        strength: Colour-distortion strength ``s`` (1.0 for ImageNet), in [0, 2.5] so hue <= 0.5.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 2.5:
        raise ValueError(f"strength must be a number in [0, 2.5], got {strength!r}")
    s = float(strength)
    return Compose(
        [
            RandomResizedCrop(size=size, scale=(0.08, 1.0)),
            RandomHorizontalFlip(p=0.5),
            ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8),
            RandomGrayscale(p=0.2),
            GaussianBlur(sigma=(0.1, 2.0), p=0.5),
        ]
    )


def byol(size: int | tuple[int, int] | None = None, view: int = 1) -> Compose:
    """BYOL (Grill et al. 2020, arXiv 2006.07733, table 6) augmentation for one of its two views.

    RandomResizedCrop(scale=(0.08, 1)), horizontal flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1)
    with p=0.8, RandomGrayscale(p=0.2), GaussianBlur(sigma in [0.1, 2]) with p=1.0 (view 1) or
    0.1 (view 2), solarize (threshold 0.5) with p=0.0 (view 1) or 0.2 (view 2).

    Args:
        size: Output size of the crop; ``None`` keeps the input size.
        view: Which of BYOL's asymmetric views, 1 or 2.
    """
    if view not in (1, 2) or isinstance(view, bool):
        raise ValueError(f"view must be 1 or 2, got {view!r}")
    blur_p, solarize_p = (1.0, 0.0) if view == 1 else (0.1, 0.2)
    stages = [
        RandomResizedCrop(size=size, scale=(0.08, 1.0)),
        RandomHorizontalFlip(p=0.5),
        ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        RandomGrayscale(p=0.2),
        GaussianBlur(sigma=(0.1, 2.0), p=blur_p),
    ]
    if solarize_p > 0:
        stages.append(RandomSolarize(threshold=0.5, p=solarize_p))
    return Compose(stages)
