"""SeVa / VCD forward-diffusion noise (pure torch)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import Augmentation

__all__ = ["DiffusionNoise", "sigmoid_beta_schedule"]


def sigmoid_beta_schedule(num_steps: int = 1000, beta_start: float = 1e-5, beta_end: float = 5e-3) -> Tensor:
    r"""SeVa's noise schedule, in float64 on the CPU.

    :math:`\beta = \sigma(\mathrm{linspace}(-6, 6, T)) \cdot (\beta_{end} - \beta_{start}) + \beta_{start}`.

    Args:
        num_steps: Number of diffusion steps :math:`T`, >= 1.
        beta_start: Lower asymptote of the schedule, in (0, 1).
        beta_end: Upper asymptote, in [beta_start, 1).

    Returns:
        ``[num_steps]`` float64 tensor of :math:`\beta_t`.
    """
    _check_schedule(num_steps, beta_start, beta_end)
    grid = torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)
    return torch.sigmoid(grid) * (beta_end - beta_start) + beta_start


def _check_schedule(num_steps: int, beta_start: float, beta_end: float) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not (isinstance(beta_start, (int, float)) and 0.0 < beta_start < 1.0):
        raise ValueError(f"beta_start must be in (0, 1), got {beta_start!r}")
    if not (isinstance(beta_end, (int, float)) and beta_start <= beta_end < 1.0):
        raise ValueError(f"beta_end must be in [beta_start, 1), got {beta_end!r}")


class DiffusionNoise(Augmentation):
    r"""Forward-diffusion noise at a fixed step, as SeVa (arXiv 2404.10501) and VCD use it.

    With :math:`\bar\alpha_t = \prod_{i \le t} (1 - \beta_i)` (``t`` is 0-based, as in the
    reference code), the output is
    :math:`x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon`,
    :math:`\epsilon \sim \mathcal N(0, I)`, i.e. mean :math:`\sqrt{\bar\alpha_t} x_0` and variance
    :math:`1 - \bar\alpha_t` per element. SeVa applies it to the processor-normalised pixel tensor;
    it works on any value range and does not clamp.

    Args:
        step: Diffusion step :math:`t` in ``[0, num_steps)``; SeVa uses 500 (default) and 800.
        num_steps: Number of steps :math:`T` of the schedule, >= 1.
        beta_start: Lower asymptote of the sigmoid beta schedule, in (0, 1).
        beta_end: Upper asymptote of the sigmoid beta schedule, in [beta_start, 1).
    """

    unit_range: ClassVar[bool] = False

    def __init__(
        self,
        step: int = 500,
        num_steps: int = 1000,
        beta_start: float = 1e-5,
        beta_end: float = 5e-3,
    ) -> None:
        super().__init__()
        _check_schedule(num_steps, beta_start, beta_end)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
            raise ValueError(f"step must be an int in [0, num_steps={num_steps}), got {step!r}")
        self.step = step
        self.num_steps = num_steps
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        alpha_bar = float(self.alphas_cumprod[step])
        self.signal_scale = math.sqrt(alpha_bar)
        self.noise_scale = math.sqrt(1.0 - alpha_bar)

    @property
    def betas(self) -> Tensor:
        """The ``[num_steps]`` float64 beta schedule."""
        return sigmoid_beta_schedule(self.num_steps, self.beta_start, self.beta_end)

    @property
    def alphas_cumprod(self) -> Tensor:
        r"""The ``[num_steps]`` float64 :math:`\bar\alpha_t = \prod_{i \le t}(1 - \beta_i)`."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def augment(self, images: Tensor) -> Tensor:
        noise = torch.randn_like(images)
        return images * self.signal_scale + noise * self.noise_scale

    def extra_repr(self) -> str:
        return (
            f"step={self.step}, num_steps={self.num_steps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}"
        )
