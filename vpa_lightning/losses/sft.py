"""SFT: negative log-likelihood of the chosen responses, as a loss to combine with others."""

from __future__ import annotations

from torch import Tensor

from .base import LossBatch, LossOutput, PreferenceLoss
from .rpo import chosen_nll

__all__ = ["SFTLoss"]


class SFTLoss(PreferenceLoss):
    r"""Supervised fine-tuning term on the preferred responses (the "generation loss" of MPO,
    arXiv:2411.10442 Eq. 4; TRL's ``sft`` loss type): the NLL of every pair's chosen response
    under the policy, reference-free. Meant for :class:`~vpa_lightning.losses.CombinedLoss`.

    Args:
        nll_reduction: ``"token"`` (default, TRL's: the mean over all chosen tokens of the
            batch, long responses weigh more) or ``"sequence"`` (mean of per-response means).
        beta: Only scales the reported rewards (``beta * log-prob``).
    """

    reference_free = True

    def __init__(self, nll_reduction: str = "token", beta: float = 0.1) -> None:
        super().__init__(beta)
        if nll_reduction not in ("sequence", "token"):
            raise ValueError(f"nll_reduction must be 'sequence' or 'token', got {nll_reduction!r}")
        self.nll_reduction = nll_reduction

    def extra_repr(self) -> str:
        return f"nll_reduction={self.nll_reduction!r}"

    def batch_loss(self, b: LossBatch) -> LossOutput:
        losses = chosen_nll(b, self.nll_reduction)
        loss: Tensor = losses.mean()
        return self._output(b, loss, losses)
