"""Listwise losses over a group's K responses: Plackett-Luce (listwise DPO) and LiPO-lambda."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossBatch, LossOutput, PreferenceLoss, check_non_negative

__all__ = ["LiPOLambdaLoss", "PlackettLuceLoss", "rank_keys"]

_RANK_BY = ("strength", "score")


def rank_keys(b: LossBatch, rank_by: str) -> Tensor:
    """``[N]`` the value each response is ranked by (higher = better): its Bradley-Terry
    ``strength`` or mean ``score`` from the shard. A row without it (``nan``) falls back to its
    net wins in the group's pairs (chosen +1, rejected -1), so pairwise-only shards still rank."""
    n = b.policy_logps.shape[0]
    device = b.policy_logps.device
    ones = torch.ones_like(b.chosen, dtype=torch.float64)
    wins = torch.zeros(n, dtype=torch.float64, device=device).index_add(0, b.chosen, ones).index_add(
        0, b.rejected, -ones
    )
    values = b.strength if rank_by == "strength" else b.scores
    if values is None:
        return wins
    values = values.to(device=device, dtype=torch.float64)
    return torch.where(torch.isnan(values), wins, values)


class _ListwiseLoss(PreferenceLoss):
    def __init__(
        self, beta: float = 0.1, rank_by: str = "strength", tie_tolerance: float = 1e-6, average_logps: bool | None = None
    ) -> None:
        super().__init__(beta, average_logps)
        if rank_by not in _RANK_BY:
            raise ValueError(f"rank_by must be one of {_RANK_BY}, got {rank_by!r}")
        self.rank_by = rank_by
        self.tie_tolerance = check_non_negative(tie_tolerance, "tie_tolerance")

    def extra_repr(self) -> str:
        return f"beta={self.beta}, rank_by={self.rank_by!r}, tie_tolerance={self.tie_tolerance}"

    def required_inputs(self) -> frozenset[str]:
        return frozenset({"scores"})

    def _setup(self, b: LossBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(ratios [N], rewards [N], keys [N], same_group [N, N])``."""
        ratios = self.row_log_ratios(b)
        keys = rank_keys(b, self.rank_by)
        same = b.row_group[:, None] == b.row_group[None, :]
        return ratios, self.beta * ratios, keys, same


class PlackettLuceLoss(_ListwiseLoss):
    r"""Listwise DPO: the Plackett-Luce likelihood of each group's whole ranking of its K responses.

    Rafailov et al., "Direct Preference Optimization", arXiv:2305.18290, App. A.3 (the DPO
    objective for rankings); Liu et al., "LiPO: Listwise Preference Optimization through
    Learning-to-Rank", arXiv:2402.01878 (list MLE). With implicit rewards
    :math:`r_k = \beta[\log\pi(y_k) - \log\pi_{ref}(y_k)]` and the responses ranked
    :math:`\tau(1) \succ \dots \succ \tau(K)` by the shard (``rank_by``: the Bradley-Terry
    strength, or the mean score), per group

    .. math::

        \mathcal{L} = -\sum_{k=1}^{K} \Big[r_{\tau(k)} - \log\sum_{j \ge k} e^{r_{\tau(j)}}\Big]

    **Ties** (keys within ``tie_tolerance``) follow Breslow's rule for tied events: tied
    responses share one risk set, each term's denominator runs over the whole tied block and
    everything ranked below it (so no arbitrary order is imposed on equals). A group whose
    responses all tie carries no ranking and is left out. The loss is the mean over groups.
    With K = 2 and no tie it is exactly DPO's sigmoid loss. All K responses come from the same
    one-forward-per-group batch (prefix sharing and the reference cache apply as usual).

    Args:
        beta: Inverse temperature of the implicit reward, > 0.
        rank_by: ``"strength"`` (Bradley-Terry, default) or ``"score"`` (mean rating).
        tie_tolerance: Keys closer than this are tied, >= 0.
        average_logps: Length-averaged log-probs (default: summed).
    """

    def batch_loss(self, b: LossBatch) -> LossOutput:
        ratios, rewards, keys, same = self._setup(b)
        # risk set of row i: rows of its group not strictly better than it
        risk = same & (keys[None, :] <= keys[:, None] + self.tie_tolerance)
        lse = torch.logsumexp(rewards[None, :].masked_fill(~risk, float("-inf")), dim=1)
        terms = rewards - lse  # <= 0
        g = b.num_groups
        per_group = torch.zeros(g, dtype=terms.dtype, device=terms.device).index_add(0, b.row_group, -terms)
        ranked = torch.zeros(g, dtype=torch.bool, device=terms.device).index_fill(
            0, b.row_group[risk.sum(dim=1) < same.sum(dim=1)], True
        )  # some row has a strictly better one in its group
        losses = per_group[ranked]
        loss = losses.mean() if losses.numel() else rewards.sum() * 0.0
        return self._output(b, loss, losses, ratios)


class LiPOLambdaLoss(_ListwiseLoss):
    r"""LiPO-lambda (Liu et al., "LiPO: Listwise Preference Optimization through Learning-to-Rank",
    arXiv:2402.01878, Eq. 6, the LambdaLoss weighting): lambda-weighted logistic terms over **all**
    ordered pairs of a group,

    .. math::

        \mathcal{L} = \sum_{\psi_i > \psi_j} \Delta_{ij}\,\log\big(1 + e^{-(s_i - s_j)}\big),\quad
        \Delta_{ij} = |G_i - G_j|\,\Big|\frac{1}{D(\tau_i)} - \frac{1}{D(\tau_j)}\Big|,

    with scores :math:`s = \beta[\log\pi - \log\pi_{ref}]`, labels :math:`\psi` from the shard
    (``rank_by``), gains :math:`G = 2^{\psi} - 1`, the rank :math:`\tau_i` of response i in its
    group under the current :math:`s` (1 = best; detached) and the discount
    :math:`D(\tau) = \log_2(1 + \tau)` (NDCG's base, as in LambdaLoss; the paper writes
    :math:`\log(1 + \tau)`, and the base only rescales the loss). Tied pairs (labels within ``tie_tolerance``) contribute
    nothing. The loss is the sum per group, averaged over groups.

    Args:
        beta: Inverse temperature of the implicit reward, > 0.
        rank_by: ``"strength"`` (Bradley-Terry, default) or ``"score"`` (mean rating).
        tie_tolerance: Labels closer than this are tied, >= 0.
        average_logps: Length-averaged log-probs (default: summed).
    """

    def batch_loss(self, b: LossBatch) -> LossOutput:
        ratios, s, keys, same = self._setup(b)
        better = same & (keys[:, None] > keys[None, :] + self.tie_tolerance)  # [i, j]: i above j
        with torch.no_grad():
            # rank of each row in its group under the current scores (1 = best; ties broken by index)
            above = same & ((s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (torch.arange(len(s), device=s.device)[None, :] < torch.arange(len(s), device=s.device)[:, None])))
            rank = above.sum(dim=1).to(s.dtype) + 1.0
            inv_discount = 1.0 / torch.log2(1.0 + rank)
            gain = torch.pow(2.0, keys.to(s.dtype)) - 1.0
            delta = (gain[:, None] - gain[None, :]).abs() * (inv_discount[:, None] - inv_discount[None, :]).abs()
        terms = delta * -F.logsigmoid(s[:, None] - s[None, :])
        terms = torch.where(better, terms, torch.zeros_like(terms))
        g = b.num_groups
        per_group = torch.zeros(g, dtype=s.dtype, device=s.device).index_add(0, b.row_group, terms.sum(dim=1))
        has_pair = torch.zeros(g, dtype=torch.bool, device=s.device).index_fill(0, b.row_group[better.any(dim=1)], True)
        losses = per_group[has_pair]
        loss = losses.mean() if losses.numel() else s.sum() * 0.0
        return self._output(b, loss, losses, ratios)
