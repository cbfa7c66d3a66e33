"""A weighted sum of preference losses (MPO and any other mixture)."""

from __future__ import annotations

import math

from torch import nn

from .base import LossBatch, LossOutput, PreferenceLoss

__all__ = ["CombinedLoss"]


class CombinedLoss(PreferenceLoss):
    r"""A weighted sum of other losses on the same batch: :math:`\mathcal{L} = \sum_i w_i \mathcal{L}_i`.

    MPO (Wang et al., "Enhancing the Reasoning Ability of Multimodal Large Language Models via
    Mixed Preference Optimization", arXiv:2411.10442, Eq. 1-4) is
    ``CombinedLoss([DPOLoss(beta=0.1), BCOPairLoss(beta=0.1), SFTLoss()], weights=[0.8, 0.2, 1.0])``
    (preference, quality and generation losses; InternVL's published weights, see
    ``configs/mpo_internvl.yaml``). Any mixture works; each part keeps its own options (beta,
    averaging, weighting), its own needs (the union is computed once per step), and its state
    (BCO's shift is saved as ``loss_fn.losses.<i>.*``). The reference is skipped only if every
    part is reference-free. Rewards and log-probs are reported from the first part.

    Args:
        losses: The parts (``class_path`` / ``init_args`` each in YAML).
        weights: One weight per part (default 1 each), finite and >= 0.
    """

    def __init__(self, losses: list[PreferenceLoss], weights: list[float] | None = None) -> None:
        if not losses:
            raise ValueError("losses must name at least one loss")
        super().__init__(losses[0].beta)
        for i, part in enumerate(losses):
            if not isinstance(part, PreferenceLoss):
                raise TypeError(f"losses[{i}] is a {type(part).__name__}, not a PreferenceLoss")
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if len(weights) != len(losses):
            raise ValueError(f"weights has {len(weights)} entries for {len(losses)} losses")
        if any(not (math.isfinite(w) and w >= 0.0) for w in weights):
            raise ValueError(f"weights must be finite numbers >= 0, got {weights}")
        self.losses = nn.ModuleList(losses)
        self.weights = weights
        self.reference_free = all(part.reference_free for part in losses)
        self.extra_inputs = frozenset().union(*(part.extra_inputs for part in losses))
        self.average_logps = losses[0].average_logps

    def required_inputs(self) -> frozenset[str]:
        return frozenset().union(*(part.required_inputs() for part in self.losses))

    def extra_repr(self) -> str:
        return f"weights={self.weights}"

    def batch_loss(self, b: LossBatch) -> LossOutput:
        outs = [part.batch_loss(b) for part in self.losses]
        loss = sum(w * o.loss for w, o in zip(self.weights, outs))
        first = outs[0]
        losses = loss.detach().reshape(1)
        return LossOutput(loss, losses, first.chosen_rewards, first.rejected_rewards, first.chosen_logps, first.rejected_logps)
