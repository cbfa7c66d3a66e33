"""Common interface of the preference losses.

Every loss in :mod:`vpa_lightning.losses` works on *sequence* log-probabilities
that the caller has already computed (see :mod:`vpa_lightning.models.logps`):
one number per response, usually the sum of the token log-probs of the
response given the prompt and image (IPO is meant to be used with the
length-averaged value instead, see :class:`~vpa_lightning.losses.IPOLoss`).

Conventions shared by all losses
--------------------------------
* All log-prob arguments are 1-D tensors of shape ``[B]`` (one entry per
  preference pair), in the same dtype/device.
* ``forward`` returns ``(losses, chosen_rewards, rejected_rewards)``, all of
  shape ``[B]``. ``losses`` is the **per-pair** loss, not reduced: the trainer
  takes ``losses.mean()`` (or a weighted mean). Per-pair values keep the losses
  usable with sample weights and per-example logging.
* ``chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)`` and the
  same for rejected, **detached** (they are metrics, never part of the graph).
  For a reference-free loss the reference terms are taken as zero.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

__all__ = ["PreferenceLoss", "check_beta", "check_non_negative", "check_unit_interval"]


def check_beta(beta: float, name: str = "beta") -> float:
    """Return ``float(beta)`` or raise ``ValueError`` if it is not a finite positive number."""
    beta = float(beta)
    if not (beta > 0.0) or beta == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}")
    return beta


def check_non_negative(value: float, name: str) -> float:
    """Return ``float(value)`` or raise ``ValueError`` if it is negative, inf or NaN."""
    value = float(value)
    if not (0.0 <= value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_unit_interval(value: float, name: str, upper: float = 1.0, upper_inclusive: bool = False) -> float:
    """Return ``float(value)`` or raise ``ValueError`` unless ``0 <= value < upper`` (``<=`` if inclusive)."""
    value = float(value)
    ok = 0.0 <= value <= upper if upper_inclusive else 0.0 <= value < upper
    if not ok:
        bracket = "]" if upper_inclusive else ")"
        raise ValueError(f"{name} must be in [0, {upper}{bracket}, got {value!r}")
    return value


class PreferenceLoss(nn.Module, abc.ABC):
    """Abstract base of a pairwise preference loss.

    Subclasses implement :meth:`forward`; they hold hyper-parameters only (no
    trainable parameters), so moving them between devices is a no-op.

    Attributes:
        reference_free: ``True`` when the loss does not use a reference model;
            the trainer can then skip the reference forward pass and pass
            ``None`` for ``ref_chosen_logps`` / ``ref_rejected_logps``.
        beta: Temperature applied to the log-ratio margins and to the
            reported rewards.
        extra_inputs: Names of the keyword inputs :meth:`forward` needs beyond the four
            log-prob tensors (e.g. RPO's ``chosen_nll``); the trainer computes exactly these.
    """

    reference_free: bool = False
    extra_inputs: frozenset[str] = frozenset()

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = check_beta(beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"

    # -- helpers shared by subclasses -------------------------------------------------
    def _ref_or_zero(self, ref: Tensor | None, like: Tensor, name: str) -> Tensor:
        if ref is None:
            if not self.reference_free:
                raise ValueError(f"{name} is required by {type(self).__name__} (reference_free=False)")
            return torch.zeros_like(like)
        if ref.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(ref.shape)}, expected {tuple(like.shape)}")
        return ref

    def log_ratios(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(chosen_log_ratio, rejected_log_ratio)`` = policy - reference, per pair."""
        if policy_chosen_logps.shape != policy_rejected_logps.shape:
            raise ValueError(
                "policy_rejected_logps has shape "
                f"{tuple(policy_rejected_logps.shape)}, expected {tuple(policy_chosen_logps.shape)}"
            )
        ref_c = self._ref_or_zero(ref_chosen_logps, policy_chosen_logps, "ref_chosen_logps")
        ref_r = self._ref_or_zero(ref_rejected_logps, policy_rejected_logps, "ref_rejected_logps")
        return policy_chosen_logps - ref_c, policy_rejected_logps - ref_r

    def rewards(self, chosen_log_ratio: Tensor, rejected_log_ratio: Tensor) -> tuple[Tensor, Tensor]:
        """Implicit rewards ``beta * (policy - ref)``, detached."""
        return (self.beta * chosen_log_ratio).detach(), (self.beta * rejected_log_ratio).detach()

    # -- interface --------------------------------------------------------------------
    @abc.abstractmethod
    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Compute the loss.

        Args:
            policy_chosen_logps: ``[B]`` log-probs of the chosen responses under the policy.
            policy_rejected_logps: ``[B]`` log-probs of the rejected responses under the policy.
            ref_chosen_logps: ``[B]`` same under the frozen reference model
                (``None`` only for reference-free losses).
            ref_rejected_logps: ``[B]`` same under the frozen reference model.

        Returns:
            ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``;
            ``losses`` is per pair (reduce with ``.mean()``), rewards are detached.
        """
