"""ORPO: monolithic odds-ratio preference optimisation (SFT + odds-ratio term, no reference)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossBatch, PairwiseLoss
from .rpo import chosen_nll

__all__ = ["ORPOLoss", "log1mexp"]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPOLoss(PairwiseLoss):
    r"""ORPO (Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691, Eq. 6-7):

    .. math::

        \mathcal{L} = \mathcal{L}_{SFT}(y_w) - \lambda\,\log\sigma\Big(\log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)}\Big),
        \qquad \mathrm{odds}(y) = \frac{P(y\mid x)}{1 - P(y\mid x)},\quad P(y\mid x) = \exp\Big(\frac{1}{|y|}\log\pi(y\mid x)\Big)

    on **length-averaged** log-probs (default), with ``beta`` = :math:`\lambda`; reference-free
    (no reference forward, cache or copy). As TRL's ``ORPOTrainer.odds_ratio_loss``; the SFT term
    is the mean NLL over the chosen responses' tokens of the batch (``nll_reduction="token"``, TRL's;
    TRL also scores the prompt tokens, here only the response is trained on) or per sequence.
    Rewards are reported as ``beta * mean log-prob``, as in TRL.

    Args:
        beta: Weight :math:`\lambda` of the odds-ratio term, > 0 (paper: 0.1-0.25).
        nll_reduction: ``"token"`` (batch token mean, default) or ``"sequence"``.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    reference_free = True
    default_average_logps = True

    def __init__(self, beta: float = 0.1, nll_reduction: str = "token", **kwargs) -> None:
        super().__init__(beta, **kwargs)
        if nll_reduction not in ("sequence", "token"):
            raise ValueError(f"nll_reduction must be 'sequence' or 'token', got {nll_reduction!r}")
        if not self.average_logps:
            raise ValueError("ORPOLoss needs length-averaged log-probs (its odds use P = exp(mean log-prob))")
        self.nll_reduction = nll_reduction

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nll_reduction={self.nll_reduction!r}"

    def pair_extras(self, b: LossBatch, chosen_values: Tensor) -> dict[str, Tensor]:
        return {"chosen_nll": chosen_nll(b, self.nll_reduction)}

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float, *, chosen_nll: Tensor) -> Tensor:
        """``chosen`` / ``rejected`` are mean log-probs (< 0); ``chosen_nll`` the ``[B]`` SFT term."""
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        return chosen_nll - beta * F.logsigmoid(log_odds)
