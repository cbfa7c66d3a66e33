"""APO: anchored preference optimisation (zero and down anchors)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import PairwiseLoss

__all__ = ["APODownLoss", "APOZeroLoss"]


class APOZeroLoss(PairwiseLoss):
    r"""APO-zero (D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266, Eq. 7): for when the chosen answers are better than the model's own,

    .. math::

        \mathcal{L} = 1 - \sigma(\beta r_w) + \sigma(\beta r_l),\qquad r = \log\pi(y) - \log\pi_{ref}(y)

    (raise the chosen likelihood, lower the rejected one). As TRL's ``apo_zero``.

    Args:
        beta: Inverse temperature, > 0.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        return 1.0 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


class APODownLoss(PairwiseLoss):
    r"""APO-down (arXiv:2408.06266, Eq. 8): for when the chosen answers are worse than the model's own,

    .. math::

        \mathcal{L} = \sigma(\beta r_w) + 1 - \sigma\big(\beta (r_w - r_l)\big)

    (lower both likelihoods, the rejected one more). As TRL's ``apo_down``.

    Args:
        beta: Inverse temperature, > 0.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        return torch.sigmoid(beta * chosen) + 1.0 - torch.sigmoid(beta * (chosen - rejected))
