"""RPO: DPO plus an NLL term on the chosen response."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import PreferenceLoss, check_non_negative

__all__ = ["RPOLoss"]


class RPOLoss(PreferenceLoss):
    r"""DPO + negative log-likelihood of the chosen response (RPO / "DPO+NLL").

    Pang et al., "Iterative Reasoning Preference Optimization",
    arXiv:2404.19733, Eq. 1-3:

    .. math::

        \mathcal{L} = -\log\sigma(\beta h) + \alpha\,\mathrm{NLL}(y_w),\qquad
        \mathrm{NLL}(y_w) = -\frac{\log\pi(y_w\mid x)}{|y_w|}

    with :math:`h = [\log\pi(y_w) - \log\pi_{ref}(y_w)] - [\log\pi(y_l) - \log\pi_{ref}(y_l)]`.
    The paper writes :math:`\mathcal{L}_{NLL} + \alpha\mathcal{L}_{DPO}` (weight on
    the DPO term); here, as in TRL (``rpo_alpha`` / ``loss_type=["sigmoid", "sft"]``),
    ``alpha`` weights the NLL term. Both coincide at the paper's default ``alpha = 1``.

    Extra input of :meth:`forward`: ``chosen_nll`` (keyword, required), the
    ``[B]`` length-normalised NLL of each chosen response under the **policy**,
    with gradient, i.e. ``-policy_chosen_sum_logps / n_chosen_tokens`` (the
    ``sum_logps`` and ``n_tokens`` outputs of
    :func:`vpa_lightning.models.logps.group_logps`). The paper normalises by
    prompt+response length; normalising by the response length only (what is
    trained on) is the common implementation choice.

    Args:
        beta: Inverse temperature of the DPO term, > 0.
        alpha: Weight of the chosen-response NLL term, >= 0 (0 gives plain DPO).
    """

    extra_inputs = frozenset({"chosen_nll"})

    def __init__(self, beta: float = 0.1, alpha: float = 1.0) -> None:
        super().__init__(beta)
        self.alpha = check_non_negative(alpha, "alpha")

    def extra_repr(self) -> str:
        return f"beta={self.beta}, alpha={self.alpha}"

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
        *,
        chosen_nll: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """See :class:`PreferenceLoss.forward`; ``chosen_nll`` is the ``[B]`` per-token NLL of the chosen responses."""
        if chosen_nll is None:
            raise ValueError("chosen_nll is required by RPOLoss")
        if chosen_nll.shape != policy_chosen_logps.shape:
            raise ValueError(
                f"chosen_nll has shape {tuple(chosen_nll.shape)}, expected {tuple(policy_chosen_logps.shape)}"
            )
        chosen, rejected = self.log_ratios(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
        losses = -F.logsigmoid(self.beta * (chosen - rejected)) + self.alpha * chosen_nll
        return (losses, *self.rewards(chosen, rejected))
