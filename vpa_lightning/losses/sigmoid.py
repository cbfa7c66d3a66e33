"""DPO sigmoid loss (with the conservative / label-smoothed cDPO variant)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import PreferenceLoss, check_unit_interval

__all__ = ["DPOLoss"]


class DPOLoss(PreferenceLoss):
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
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__(beta)
        self.label_smoothing = check_unit_interval(label_smoothing, "label_smoothing", 0.5, upper_inclusive=True)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, label_smoothing={self.label_smoothing}"

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        chosen, rejected = self.log_ratios(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
        z = self.beta * (chosen - rejected)
        eps = self.label_smoothing
        losses = -(1.0 - eps) * F.logsigmoid(z)
        if eps > 0.0:
            losses = losses - eps * F.logsigmoid(-z)
        return (losses, *self.rewards(chosen, rejected))
