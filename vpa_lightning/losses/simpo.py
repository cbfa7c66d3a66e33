"""SimPO: reference-free, length-normalised preference optimisation with a target margin."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .base import PairwiseLoss, check_unit_interval

__all__ = ["SimPOLoss"]


class SimPOLoss(PairwiseLoss):
    r"""SimPO (Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, Eq. 6):

    .. math::

        \mathcal{L} = -\log\sigma\Big(\frac{\beta}{|y_w|}\log\pi(y_w\mid x)
                      - \frac{\beta}{|y_l|}\log\pi(y_l\mid x) - \gamma\Big)

    The implicit reward is the policy's **length-averaged** log-prob (``average_logps`` true by
    default) and there is **no reference model**: the module runs no reference forward, opens
    no reference cache and keeps no frozen copy. Same as TRL's ``CPOTrainer`` with
    ``loss_type="simpo"`` (``simpo_gamma`` = gamma) and the paper's recommended
    ``beta`` 2-2.5, ``gamma / beta`` about 0.5 (defaults: 2.0 and 1.0).

    Args:
        beta: Reward scale, > 0.
        gamma: Target reward margin gamma (>= 0 usually; any finite number).
        label_smoothing: cDPO-style label smoothing in [0, 0.5] (as TRL's CPO); 0 = the paper's loss.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    reference_free = True
    default_average_logps = True

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(beta, **kwargs)
        gamma = float(gamma)
        if not math.isfinite(gamma):
            raise ValueError(f"gamma must be a finite number, got {gamma!r}")
        self.gamma = gamma
        self.label_smoothing = check_unit_interval(label_smoothing, "label_smoothing", 0.5, upper_inclusive=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, label_smoothing={self.label_smoothing}"

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        z = beta * (chosen - rejected) - self.gamma
        eps = self.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(z)
        if eps > 0.0:
            losses = losses - eps * F.logsigmoid(-z)
        return losses
