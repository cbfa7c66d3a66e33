"""NCA: noise-contrastive alignment (pair form)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import PairwiseLoss

__all__ = ["NCALoss"]


class NCALoss(PairwiseLoss):
    r"""NCA, pairwise preference form (Chen et al., "Noise Contrastive Alignment of Language Models
    with Explicit Rewards", arXiv:2402.05369, Eq. 11 with K = 2): absolute rather than relative
    likelihoods, so the chosen likelihood does not fall with the rejected one,

    .. math::

        \mathcal{L} = -\log\sigma(\beta r_w) - \tfrac12\log\sigma(-\beta r_w) - \tfrac12\log\sigma(-\beta r_l),
        \qquad r = \log\pi - \log\pi_{ref}

    As TRL's ``nca_pair``.

    Args:
        beta: Inverse temperature, > 0.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        rc, rr = beta * chosen, beta * rejected
        return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
