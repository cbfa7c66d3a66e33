"""mDPO: conditional preference optimisation for multimodal LLMs."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .base import PairwiseLoss, check_non_negative

__all__ = ["MDPOLoss"]


class MDPOLoss(PairwiseLoss):
    r"""mDPO: DPO + image-conditional preference + anchored reward.

    Wang et al., "mDPO: Conditional Preference Optimization for Multimodal
    Large Language Models", arXiv:2406.11839 (EMNLP 2024), Eq. 2-4. With
    :math:`m` the image, :math:`m'` a corrupted image (e.g. heavily cropped or
    noised), :math:`q` the question and the log-ratios
    :math:`r(y\mid m) = \log\pi(y\mid m,q) - \log\pi_{ref}(y\mid m,q)`:

    .. math::

        \mathcal{L}_{DPO}   &= -\log\sigma\big(\beta\,[r(y_w\mid m) - r(y_l\mid m)]\big)\\
        \mathcal{L}_{CoPO}  &= -\log\sigma\big(\beta\,[r(y_w\mid m) - r(y_w\mid m')]\big)\\
        \mathcal{L}_{AncPO} &= -\log\sigma\big(\beta\,r(y_w\mid m) - \delta\big)\\
        \mathcal{L} &= \mathcal{L}_{DPO} + \lambda_c\,\mathcal{L}_{CoPO} + \lambda_a\,\mathcal{L}_{AncPO}

    The paper uses :math:`\delta = 0` and unit weights (the defaults).
    The image-conditional term prefers the chosen answer given the real image
    over the *same* answer given the corrupted image, so the policy cannot
    ignore the image; the anchor keeps the chosen reward above :math:`\delta/\beta`
    so that DPO does not lower both likelihoods.

    Extra keyword inputs of :meth:`forward` (both required, shape ``[B]``):
    ``policy_corrupted_chosen_logps`` and ``ref_corrupted_chosen_logps``, the
    log-probs of the chosen response when the prompt carries the corrupted image,
    under the policy (with gradient) and the reference model.

    Args:
        beta: Inverse temperature shared by the three terms, > 0.
        conditional_weight: Weight :math:`\lambda_c` of the image-conditional term, >= 0.
        anchor_weight: Weight :math:`\lambda_a` of the anchor term, >= 0.
        anchor: Anchor value :math:`\delta` (a reward margin, in the same units as
            ``beta * log-ratio``); the anchor loss pushes ``beta * r(y_w|m)`` above it.
        **kwargs: Options of every pairwise loss (see :class:`~vpa_lightning.losses.PairwiseLoss`):
            ``average_logps``, ``pair_weighting``, ``beta_margin_scale``, ``ld_alpha``.
    """

    extra_inputs = frozenset({"policy_corrupted_chosen_logps", "ref_corrupted_chosen_logps"})

    def __init__(
        self,
        beta: float = 0.1,
        conditional_weight: float = 1.0,
        anchor_weight: float = 1.0,
        anchor: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(beta, **kwargs)
        self.conditional_weight = check_non_negative(conditional_weight, "conditional_weight")
        self.anchor_weight = check_non_negative(anchor_weight, "anchor_weight")
        anchor = float(anchor)
        if not math.isfinite(anchor):
            raise ValueError(f"anchor must be a finite number, got {anchor!r}")
        self.anchor = anchor

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, conditional_weight={self.conditional_weight}, "
            f"anchor_weight={self.anchor_weight}, anchor={self.anchor}"
        )

    def pair_loss(
        self,
        chosen: Tensor,
        rejected: Tensor,
        beta: Tensor | float,
        *,
        policy_corrupted_chosen_logps: Tensor,
        ref_corrupted_chosen_logps: Tensor,
    ) -> Tensor:
        """mDPO per pair; the two corrupted-image inputs are ``[B]`` (see the class docstring)."""
        for name, value in (
            ("policy_corrupted_chosen_logps", policy_corrupted_chosen_logps),
            ("ref_corrupted_chosen_logps", ref_corrupted_chosen_logps),
        ):
            if value is None:
                raise ValueError(f"{name} is required by MDPOLoss")
            if value.shape != chosen.shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(chosen.shape)}")
        corrupted = policy_corrupted_chosen_logps - ref_corrupted_chosen_logps
        dpo = -F.logsigmoid(beta * (chosen - rejected))
        conditional = -F.logsigmoid(beta * (chosen - corrupted))
        anchored = -F.logsigmoid(beta * chosen - self.anchor)
        return dpo + self.conditional_weight * conditional + self.anchor_weight * anchored
