"""DPO sigmoid loss (with the conservative / label-smoothed cDPO variant)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import PairwiseLoss, check_unit_interval

__all__ = ["DPOLoss"]


class DPOLoss(PairwiseLoss):
    r"""Direct Preference Optimization, sigmoid (Bradley-Terry) loss.

    Rafailov et al., "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", arXiv:2305.18290. With ``label_smoothing`` > 0
    this is the conservative DPO (cDPO) of Mitchell, "A note on DPO with noisy
    preferences & relationship to IPO" (2023), which assumes each label is
    flipped with probability :math:`\varepsilon`.

    With :math:`h = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l) - \log\pi_{ref}(y_l)]`:

    .. math::

        \mathcal{L} = -(1-\varepsilon)\,\log\sigma(\beta h) - \varepsilon\,\log\sigma(-\beta h)

    Args:
        beta: Inverse temperature of the implicit reward (KL strength), > 0.
        label_smoothing: Probability :math:`\varepsilon` that a preference label is
            flipped (cDPO); 0 gives plain DPO. Must be in [0, 0.5].
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`):
            ``average_logps``, ``pair_weighting``, ``beta_margin_scale``, ``ld_alpha``.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(beta, **kwargs)
        self.label_smoothing = check_unit_interval(label_smoothing, "label_smoothing", 0.5, upper_inclusive=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, label_smoothing={self.label_smoothing}"

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        z = beta * (chosen - rejected)
        eps = self.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(z)
        if eps > 0.0:
            losses = losses - eps * F.logsigmoid(-z)
        return losses
