"""BCO, pair form: binary classifier optimisation with a running reward shift."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .base import PairwiseLoss

__all__ = ["BCOPairLoss"]


class BCOPairLoss(PairwiseLoss):
    r"""BCO, pair form (Jung et al., "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656, Eq. 8 / "reward shift"): the chosen and the rejected response
    are classified separately, rewards shifted by :math:`\delta`, the running mean of all rewards:

    .. math::

        \mathcal{L} = -\log\sigma(\beta r_w - \delta) - \log\sigma\big(-(\beta r_l - \delta)\big),
        \qquad r = \log\pi - \log\pi_{ref}

    :math:`\delta` is updated at every **training** step (not in validation) before the loss is
    computed, with the mean reward of the step's pairs (chosen and rejected together; averaged
    over ranks under distributed training): it is the mean of those per-step means, as the
    ``RunningMoments`` of TRL's ``bco_pair`` did before TRL 1.x dropped the shift. The shift lives
    in buffers (``running_mean``, ``running_steps``) of the loss, which are part of the module's
    ``state_dict``: a run resumed from a checkpoint continues with the same shift.
    ``shift: false`` gives TRL 1.x's ``bco_pair`` (:math:`\delta = 0`).

    Args:
        beta: Inverse temperature, > 0.
        shift: Use the running reward-mean shift :math:`\delta`.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`).
    """

    def __init__(self, beta: float = 0.1, shift: bool = True, **kwargs) -> None:
        super().__init__(beta, **kwargs)
        self.shift = bool(shift)
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running_steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={self.shift}, delta={float(self.running_mean):.6g}"

    @property
    def delta(self) -> float:
        """The current reward shift."""
        return float(self.running_mean) if self.shift else 0.0

    @torch.no_grad()
    def _update(self, rewards: Tensor) -> None:
        step_mean = rewards.double().mean()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(step_mean)
            step_mean /= dist.get_world_size()
        self.running_steps += 1
        self.running_mean += (step_mean.to(self.running_mean.device) - self.running_mean) / self.running_steps

    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float) -> Tensor:
        rc, rr = beta * chosen, beta * rejected
        if self.shift and self.training:
            self._update(torch.cat([rc.detach().reshape(-1), rr.detach().reshape(-1)]))
        delta = self.delta
        return -F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta))
