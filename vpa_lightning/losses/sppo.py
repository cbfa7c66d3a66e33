"""SPPO with hard win probabilities."""

from __future__ import annotations

from torch import Tensor

from .base import PairwiseLoss

__all__ = ["SPPOHardLoss"]


class SPPOHardLoss(PairwiseLoss):
    r"""SPPO-hard (Wu et al., "Self-Play Preference Optimization for Language Model Alignment",
    arXiv:2405.00675, Eq. 4.7 of Algorithm 1 with the win probability set to 1 for the chosen
    and 0 for the rejected response): each log-ratio is regressed to :math:`\pm 1/(2\beta)`,

    .. math::

        \mathcal{L} = \Big(r_w - \frac{1}{2\beta}\Big)^2 + \Big(r_l + \frac{1}{2\beta}\Big)^2,
        \qquad r = \log\pi - \log\pi_{ref}

    (the paper's :math:`\eta = 1/\beta`). As TRL's ``sppo_hard``.

    Args:
        beta: Inverse of the paper's :math:`\eta`, > 0.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
