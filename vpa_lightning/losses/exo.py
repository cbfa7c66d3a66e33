"""EXO: efficient exact optimisation (pair form)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PairwiseLoss

__all__ = ["EXOLoss"]


class EXOLoss(PairwiseLoss):
    r"""EXO-pref, pair form (Ji et al., "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, Eq. 16 with K = 2): the reverse KL between the policy's
    preference distribution over {chosen, rejected}, :math:`q = \mathrm{softmax}(\beta r)`, and
    the label distribution :math:`p = (1 - \varepsilon, \varepsilon)`:

    .. math::

        \mathcal{L} = \sigma(\beta h)\big[\log\sigma(\beta h) - \log(1-\varepsilon)\big]
                    + \sigma(-\beta h)\big[\log\sigma(-\beta h) - \log\varepsilon\big]

    with :math:`h = r_w - r_l`, :math:`r = \log\pi - \log\pi_{ref}`. As TRL's ``exo_pair``.

    Args:
        beta: Inverse temperature, > 0.
        epsilon: Label smoothing of the target distribution, in (0, 0.5) (the KL needs
            ``epsilon > 0``; the paper and TRL suggest 1e-3).
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    def __init__(self, beta: float = 0.1, epsilon: float = 1e-3, **kwargs) -> None:
        super().__init__(beta, **kwargs)
        epsilon = float(epsilon)
        if not 0.0 < epsilon < 0.5:
            raise ValueError(f"epsilon must be in (0, 0.5), got {epsilon!r}")
        self.epsilon = epsilon

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.epsilon}"

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        z = beta * (chosen - rejected)
        eps = self.epsilon
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
