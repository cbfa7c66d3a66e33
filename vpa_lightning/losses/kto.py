"""KTO: prospect-theoretic optimisation on unpaired desirable / undesirable responses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .base import LossBatch, LossOutput, PreferenceLoss, check_non_negative

__all__ = ["KTOLoss", "labels_from_pairs"]


def labels_from_pairs(b: LossBatch) -> Tensor:
    """``[N]`` labels from the pair structure: 1 for a response that is chosen in some pair and
    rejected in none, 0 for one rejected and never chosen, -1 (unused) otherwise."""
    n = b.policy_logps.shape[0]
    won = torch.zeros(n, dtype=torch.bool, device=b.chosen.device).index_fill(0, b.chosen, True)
    lost = torch.zeros(n, dtype=torch.bool, device=b.chosen.device).index_fill(0, b.rejected, True)
    labels = torch.full((n,), -1, dtype=torch.long, device=b.chosen.device)
    labels[won & ~lost] = 1
    labels[lost & ~won] = 0
    return labels


class KTOLoss(PreferenceLoss):
    r"""KTO (Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv:2402.01306, Eq. 7-8): every response is a sample on its own, desirable or undesirable,

    .. math::

        \mathcal{L} = \mathbb{E}\big[\lambda_y - v(x, y)\big],\quad
        v = \begin{cases}\lambda_D\,\sigma\big(\beta(r - z_0)\big) & y \text{ desirable}\\
                         \lambda_U\,\sigma\big(\beta(z_0 - r)\big) & y \text{ undesirable}\end{cases},\quad
        r = \log\pi(y\mid x) - \log\pi_{ref}(y\mid x)

    i.e. per response ``lambda_D * (1 - sigmoid(beta (r - z0)))`` or ``lambda_U * (1 - sigmoid(beta (z0 - r)))``,
    averaged over the labelled responses. The reference point :math:`z_0` estimates
    :math:`\mathrm{KL}(\pi\,\|\,\pi_{ref})` from **mismatched** pairs of the batch, as TRL does:
    each group's prompt and image with the responses of another group (the module builds
    these rows when the loss asks for ``kl_logps``), ``z0 = max(0, mean(log pi - log pi_ref))``,
    detached, averaged over ranks. A batch of one group has no mismatched pair: ``z0 = 0``.

    Labels come from the data module (``--data.unpaired threshold:3.5`` labels by score,
    ``--data.unpaired pairs`` by the pair structure); without them, from the pair structure
    (:func:`labels_from_pairs`). Summed log-probs, as in the paper and TRL.

    Args:
        beta: Inverse temperature, > 0.
        desirable_weight: :math:`\lambda_D`, >= 0.
        undesirable_weight: :math:`\lambda_U`, >= 0 (the paper: keep
            ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]).
        kl_reference_point: Estimate :math:`z_0` from mismatched pairs (``False``: ``z0 = 0``,
            no extra forward; TRL's ``calculate_KL=False``).
    """

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        kl_reference_point: bool = True,
    ) -> None:
        super().__init__(beta)
        self.desirable_weight = check_non_negative(desirable_weight, "desirable_weight")
        self.undesirable_weight = check_non_negative(undesirable_weight, "undesirable_weight")
        self.kl_reference_point = bool(kl_reference_point)

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
            f"undesirable_weight={self.undesirable_weight}, kl_reference_point={self.kl_reference_point}"
        )

    def required_inputs(self) -> frozenset[str]:
        return frozenset({"labels", "kl_logps"} if self.kl_reference_point else {"labels"})

    def reference_point(self, b: LossBatch) -> Tensor:
        """:math:`z_0` (detached scalar)."""
        zero = b.policy_logps.new_zeros(())
        if not self.kl_reference_point or b.kl_policy_logps is None or b.kl_policy_logps.numel() == 0:
            return zero
        if b.kl_ref_logps is None:
            raise ValueError("KTOLoss needs kl_ref_logps with kl_policy_logps")
        kl = (b.kl_policy_logps - b.kl_ref_logps).detach().mean()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(kl)
            kl = kl / dist.get_world_size()
        return kl.clamp(min=0)

    def batch_loss(self, b: LossBatch) -> LossOutput:
        ratios = self.row_log_ratios(b)
        labels = b.labels if b.labels is not None else labels_from_pairs(b)
        z0 = self.reference_point(b)
        desirable, undesirable = ratios[labels == 1], ratios[labels == 0]
        losses = torch.cat(
            [
                self.desirable_weight * (1.0 - torch.sigmoid(self.beta * (desirable - z0))),
                self.undesirable_weight * (1.0 - torch.sigmoid(self.beta * (z0 - undesirable))),
            ]
        )
        loss = losses.mean() if losses.numel() else ratios.sum() * 0.0
        return self._output(b, loss, losses, ratios)
