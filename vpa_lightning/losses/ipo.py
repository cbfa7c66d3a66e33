"""IPO loss."""

from __future__ import annotations

from torch import Tensor

from .base import PreferenceLoss

__all__ = ["IPOLoss"]


class IPOLoss(PreferenceLoss):
    r"""Identity Preference Optimisation (IPO).

    Azar et al., "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036. A squared loss that regresses the
    log-ratio margin to :math:`1/(2\tau)` instead of pushing it to infinity:

    .. math::

        \mathcal{L} = \left(h - \frac{1}{2\beta}\right)^2,\qquad
        h = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l) - \log\pi_{ref}(y_l)]

    where ``beta`` plays the role of the paper's regulariser :math:`\tau`.
    Following the paper's experiments (and TRL), pass **length-averaged**
    log-probs (``sum_logps / n_tokens`` from
    :func:`vpa_lightning.models.logps.group_logps`) rather than summed ones;
    with summed log-probs the target margin ``1/(2 beta)`` is not length-invariant.

    Args:
        beta: Regularisation strength :math:`\tau` (> 0); the target margin is ``1 / (2 beta)``.
    """

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
        losses = (chosen - rejected - 1.0 / (2.0 * self.beta)) ** 2
        return (losses, *self.rewards(chosen, rejected))
