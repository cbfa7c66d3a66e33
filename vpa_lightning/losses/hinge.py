"""SLiC hinge loss."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PairwiseLoss

__all__ = ["HingeLoss"]


class HingeLoss(PairwiseLoss):
    r"""Hinge (SLiC-style) preference loss on the reference-normalised margin.

    Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", arXiv:2305.10425; the reference-normalised form used here is
    the "hinge" variant of the DPO family (Rafailov et al. 2305.18290, Sec. 5 /
    TRL ``loss_type="hinge"``):

    .. math::

        \mathcal{L} = \max\left(0,\; 1 - \beta h\right),\qquad
        h = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l) - \log\pi_{ref}(y_l)]

    i.e. a margin of ``1 / beta`` in log-ratio units. SLiC's separate
    regularisation (cross-entropy on reference/SFT targets) is not part of this
    class: add an NLL term in the trainer (see :class:`RPOLoss`) if needed.

    Args:
        beta: Inverse margin (> 0): the loss is zero once the log-ratio margin exceeds ``1 / beta``.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`):
            ``average_logps``, ``pair_weighting``, ``beta_margin_scale``, ``ld_alpha``.
    """

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        return torch.relu(1.0 - beta * (chosen - rejected))
