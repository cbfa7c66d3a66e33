"""Robust DPO (unbiased estimator under label noise)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import PairwiseLoss, check_unit_interval

__all__ = ["RobustDPOLoss"]


class RobustDPOLoss(PairwiseLoss):
    r"""Robust DPO: an unbiased DPO loss under random preference flips.

    Chowdhury et al., "Provably Robust DPO: Aligning Language Models with
    Noisy Feedback", arXiv:2403.00409. If each label is flipped with known
    probability :math:`\varepsilon < 1/2`, the de-biased loss

    .. math::

        \mathcal{L} = \frac{-(1-\varepsilon)\log\sigma(\beta h) + \varepsilon\log\sigma(-\beta h)}{1 - 2\varepsilon}

    has the clean DPO loss as its expectation over the noise. Here
    :math:`h = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l) - \log\pi_{ref}(y_l)]`.
    Note the sign of the second term differs from cDPO (:class:`DPOLoss` with
    ``label_smoothing``); the per-pair loss can be negative.

    Args:
        beta: Inverse temperature of the implicit reward, > 0.
        label_smoothing: Flip probability :math:`\varepsilon`, in [0, 0.5); 0 gives plain DPO.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`):
            ``average_logps``, ``pair_weighting``, ``beta_margin_scale``, ``ld_alpha``.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(beta, **kwargs)
        self.label_smoothing = check_unit_interval(label_smoothing, "label_smoothing", 0.5)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, label_smoothing={self.label_smoothing}"

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        z = beta * (chosen - rejected)
        eps = self.label_smoothing
        losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
        return losses
