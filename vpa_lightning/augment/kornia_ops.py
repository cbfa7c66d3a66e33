"""Batched Kornia augmentations, one small class per operation.

Kornia is imported lazily, when an augmentation is constructed, so importing
``vpa_lightning.augment`` does not import it. All operations sample independent parameters per
image (``same_on_batch=False``) on the images' device. Colour operations expect ``[0, 1]`` RGB
(``C == 3``); see :class:`~vpa_lightning.augment.base.Augmentation` for ``unit_range``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

from torch import Tensor, nn

from .base import Augmentation

__all__ = [
    "ColorJitter",
    "GaussianBlur",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "RandomPosterize",
    "RandomResizedCrop",
    "RandomRotation",
    "RandomSolarize",
]


def _kornia_augmentation() -> Any:
    try:
        import kornia.augmentation as K
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "vpa_lightning.augment's Kornia augmentations need kornia: pip install 'kornia>=0.8'"
        ) from exc
    return K


# ---------------------------------------------------------------------------------------------
# Argument checks (each names the offending argument)
# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_probability(name: str, value: Any) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_range(
    name: str, value: Any, *, low: float, high: float, low_open: bool = False
) -> tuple[float, float]:
    """A (lo, hi) pair with low <= lo <= hi <= high (low exclusive when ``low_open``)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise ValueError(f"{name} must be a pair (min, max) of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    lower_ok = lo > low if low_open else lo >= low
    if not (lower_ok and lo <= hi <= high):
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{name} must satisfy {low} {'<' if low_open else '<='} min <= max <= {high} "
            f"(range {bracket}{low}, {high}]), got {value!r}"
        )
    return lo, hi


def _check_nonnegative(name: str, value: Any, *, high: float = math.inf) -> float:
    if not _is_number(value) or not 0.0 <= value <= high:
        raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}")
    return float(value)


def _check_size(name: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be None, a positive int or a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def default_blur_kernel(height: int, width: int) -> int:
    """SimCLR/BYOL's blur kernel: about 10% of the shorter side, odd, at least 3."""
    k = max(3, round(0.1 * min(height, width)))
    return k if k % 2 == 1 else k + 1


class _KorniaOp(Augmentation):
    """An augmentation backed by one Kornia module, optionally built per input size."""

    def _build(self, height: int, width: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _size_dependent(self) -> bool:
        return False

    def _op(self, images: Tensor) -> nn.Module:
        key = (int(images.shape[-2]), int(images.shape[-1])) if self._size_dependent() else None
        cache = self.__dict__.setdefault("_ops", {})
        if key not in cache:
            cache[key] = self._build(*(key or (0, 0)))
        return cache[key]

    def augment(self, images: Tensor) -> Tensor:
        return self._op(images)(images)

    def extra_repr(self) -> str:
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))


class RandomResizedCrop(_KorniaOp):
    """Crop a random area and aspect ratio, then resize (Kornia ``RandomResizedCrop``).

    Args:
        size: Output ``(height, width)`` or a single int; ``None`` (default) keeps each input's size.
        scale: Range of the crop's area as a fraction of the image, ``0 < min <= max <= 1``.
        ratio: Range of the crop's aspect ratio (width / height), ``0 < min <= max``.
        p: Probability of cropping each image, in [0, 1]. Must be 1 when ``size`` differs from the
            input size, or the batch would mix sizes.
    """

    unit_range: ClassVar[bool] = False

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        p: float = 1.0,
    ) -> None:
        super().__init__()
        self.size = _check_size("size", size)
        self.scale = _check_range("scale", scale, low=0.0, high=1.0, low_open=True)
        self.ratio = _check_range("ratio", ratio, low=0.0, high=math.inf, low_open=True)
        self.p = _check_probability("p", p)
        if self.size is None:
            _kornia_augmentation()  # fail early when kornia is missing
        else:
            self._ops = {None: self._build(*self.size)}

    def _size_dependent(self) -> bool:
        return self.size is None

    def _build(self, height: int, width: int) -> nn.Module:
        K = _kornia_augmentation()
        size = self.size or (height, width)
        return K.RandomResizedCrop(size, scale=self.scale, ratio=self.ratio, p=self.p)


class RandomHorizontalFlip(_KorniaOp):
    """Mirror images left-right (Kornia ``RandomHorizontalFlip``).

    Args:
        p: Probability of flipping each image, in [0, 1].
    """

    unit_range: ClassVar[bool] = False

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _check_probability("p", p)
        self._ops = {None: self._build(0, 0)}

    def _build(self, height: int, width: int) -> nn.Module:
        return _kornia_augmentation().RandomHorizontalFlip(p=self.p)


class ColorJitter(_KorniaOp):
    """Random brightness, contrast, saturation and hue, in random order (Kornia ``ColorJitter``,
    torchvision semantics). Expects ``[0, 1]`` RGB.

    Args:
        brightness: Brightness factor drawn from ``[max(0, 1 - b), 1 + b]``, >= 0.
        contrast: Contrast factor drawn from ``[max(0, 1 - c), 1 + c]``, >= 0.
        saturation: Saturation factor drawn from ``[max(0, 1 - s), 1 + s]``, >= 0.
        hue: Hue shift drawn from ``[-h, h]``, in [0, 0.5].
        p: Probability of jittering each image, in [0, 1].
    """

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        self.brightness = _check_nonnegative("brightness", brightness)
        self.contrast = _check_nonnegative("contrast", contrast)
        self.saturation = _check_nonnegative("saturation", saturation)
        self.hue = _check_nonnegative("hue", hue, high=0.5)
        self.p = _check_probability("p", p)
        self._ops = {None: self._build(0, 0)}

    def _build(self, height: int, width: int) -> nn.Module:
        return _kornia_augmentation().ColorJitter(
            self.brightness, self.contrast, self.saturation, self.hue, p=self.p
        )


class RandomGrayscale(_KorniaOp):
    """Convert images to grayscale, kept as 3 channels (Kornia ``RandomGrayscale``). Expects RGB.

    Args:
        p: Probability of converting each image, in [0, 1].
    """

    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        self.p = _check_probability("p", p)
        self._ops = {None: self._build(0, 0)}

    def _build(self, height: int, width: int) -> nn.Module:
        return _kornia_augmentation().RandomGrayscale(p=self.p)


class GaussianBlur(_KorniaOp):
    """Gaussian blur with a random standard deviation per image (Kornia ``RandomGaussianBlur``).

    Args:
        sigma: Range ``(min, max)`` of the blur's standard deviation in pixels, ``0 < min <= max``.
        kernel_size: Odd kernel size >= 3; ``None`` (default) uses about 10% of the image's shorter
            side, as SimCLR and BYOL do (23 px at 224 px).
        p: Probability of blurring each image, in [0, 1].
    """

    unit_range: ClassVar[bool] = False

    def __init__(
        self,
        sigma: tuple[float, float] = (0.1, 2.0),
        kernel_size: int | None = None,
        p: float = 1.0,
    ) -> None:
        super().__init__()
        self.sigma = _check_range("sigma", sigma, low=0.0, high=math.inf, low_open=True)
        if kernel_size is not None and (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or kernel_size < 3
            or kernel_size % 2 == 0
        ):
            raise ValueError(f"kernel_size must be None or an odd int >= 3, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.p = _check_probability("p", p)
        if kernel_size is None:
            _kornia_augmentation()
        else:
            self._ops = {None: self._build(0, 0)}

    def _size_dependent(self) -> bool:
        return self.kernel_size is None

    def _build(self, height: int, width: int) -> nn.Module:
        k = self.kernel_size or default_blur_kernel(height, width)
        return _kornia_augmentation().RandomGaussianBlur((k, k), self.sigma, p=self.p)


class RandomRotation(_KorniaOp):
    """Rotate by a random angle about the centre, zero (black) padding (Kornia ``RandomRotation``).

    Args:
        degrees: Maximum absolute angle in degrees (angle drawn from ``[-d, d]``), in [0, 360].
        p: Probability of rotating each image, in [0, 1].
    """

    def __init__(self, degrees: float = 30.0, p: float = 1.0) -> None:
        super().__init__()
        self.degrees = _check_nonnegative("degrees", degrees, high=360.0)
        self.p = _check_probability("p", p)
        self._ops = {None: self._build(0, 0)}

    def _build(self, height: int, width: int) -> nn.Module:
        return _kornia_augmentation().RandomRotation(self.degrees, p=self.p)


class RandomPosterize(_KorniaOp):
    """Keep only the top ``bits`` bits of each 8-bit colour channel (Kornia ``RandomPosterize``).
    Expects ``[0, 1]`` input.

    Args:
        bits: Bits to keep, an int in [1, 8], or a pair ``(min, max)`` to draw an int per image
            from ``[min, max]``.
        p: Probability of posterizing each image, in [0, 1].
    """

    def __init__(self, bits: int | tuple[int, int] = 4, p: float = 1.0) -> None:
        super().__init__()
        pair = (bits, bits) if isinstance(bits, int) and not isinstance(bits, bool) else bits
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8 for b in pair)
            or pair[0] > pair[1]
        ):
            raise ValueError(f"bits must be an int in [1, 8] or a pair 1 <= min <= max <= 8, got {bits!r}")
        self.bits = (int(pair[0]), int(pair[1]))
        self.p = _check_probability("p", p)
        self._ops = {None: self._build(0, 0)}

    def _build(self, height: int, width: int) -> nn.Module:
        return _kornia_augmentation().RandomPosterize(bits=self.bits, p=self.p)


class RandomSolarize(_KorniaOp):
    """Invert pixels above a threshold (Kornia ``RandomSolarize``, no brightness addition).
    Expects ``[0, 1]`` input. BYOL uses threshold 0.5 with p = 0.2 on its second view.

    Args:
        threshold: Threshold in [0, 1], or a pair ``(min, max)`` to draw one per image.
        p: Probability of solarizing each image, in [0, 1].
    """

    def __init__(self, threshold: float | tuple[float, float] = 0.5, p: float = 0.2) -> None:
        super().__init__()
        pair = (threshold, threshold) if _is_number(threshold) else threshold
        self.threshold = _check_range("threshold", pair, low=0.0, high=1.0)
        self.p = _check_probability("p", p)
        self._ops = {None: self._build(0, 0)}

    def _build(self, height: int, width: int) -> nn.Module:
        return _kornia_augmentation().RandomSolarize(
            thresholds=self.threshold, additions=(0.0, 0.0), p=self.p
        )
