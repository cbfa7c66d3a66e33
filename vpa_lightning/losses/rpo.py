"""RPO: DPO plus an NLL term on the chosen response."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import LossBatch, PairwiseLoss, check_non_negative

__all__ = ["RPOLoss"]


class RPOLoss(PairwiseLoss):
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

    The NLL is computed from the policy's summed log-probs and token counts of the chosen
    responses (with gradient), normalised as ``nll_reduction`` says:

    * ``"sequence"`` (default): each pair's own ``-log pi(y_w) / |y_w|`` (the paper normalises
      per sequence; by the response length here, which is what is trained on);
    * ``"token"``: TRL's ``sft`` term, one number for the batch, the mean NLL over all the
      chosen tokens of all pairs, ``-sum_i log pi(y_w^i) / sum_i |y_w^i|`` (long responses
      weigh more).

    :meth:`forward` takes the per-pair NLL as the keyword ``chosen_nll`` (``[B]``, required).

    Args:
        beta: Inverse temperature of the DPO term, > 0.
        alpha: Weight of the chosen-response NLL term, >= 0 (0 gives plain DPO).
        nll_reduction: ``"sequence"`` or ``"token"`` (TRL's), see above.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`):
            ``average_logps``, ``pair_weighting``, ``beta_margin_scale``, ``ld_alpha``.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 1.0, nll_reduction: str = "sequence", **kwargs) -> None:
        super().__init__(beta, **kwargs)
        self.alpha = check_non_negative(alpha, "alpha")
        if nll_reduction not in ("sequence", "token"):
            raise ValueError(f"nll_reduction must be 'sequence' or 'token', got {nll_reduction!r}")
        self.nll_reduction = nll_reduction

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, nll_reduction={self.nll_reduction!r}"

    def pair_extras(self, b: LossBatch, chosen_values: Tensor) -> dict[str, Tensor]:
        return {"chosen_nll": chosen_nll(b, self.nll_reduction)}

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float, *, chosen_nll: Tensor) -> Tensor:
        if chosen_nll is None:
            raise ValueError("chosen_nll is required by RPOLoss")
        if chosen_nll.shape != chosen.shape:
            raise ValueError(f"chosen_nll has shape {tuple(chosen_nll.shape)}, expected {tuple(chosen.shape)}")
        return -F.logsigmoid(beta * (chosen - rejected)) + self.alpha * chosen_nll


def chosen_nll(b: LossBatch, reduction: str) -> Tensor:
    """``[P]`` NLL of every pair's chosen response under the policy: per sequence
    (``-log pi / |y|``) or TRL's batch token mean (the same value for every pair)."""
    sums, n = b.policy_logps[b.chosen], b.n_tokens[b.chosen].to(b.policy_logps.dtype)
    if reduction == "sequence":
        return -sums / n.clamp(min=1)
    return (-sums.sum() / n.sum().clamp(min=1)).expand_as(sums)
