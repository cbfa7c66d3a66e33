"""Common interface of the preference losses.

Every loss in :mod:`vpa_lightning.losses` works on *sequence* log-probabilities
that the caller has already computed (see :mod:`vpa_lightning.models.logps`).
Two entry points:

* :meth:`PreferenceLoss.batch_loss` takes a :class:`LossBatch` (what
  :class:`~vpa_lightning.module.VisionDPOModule` builds each step: the summed
  log-prob and token count of every response of every group, under the policy and
  the reference, plus the pairs, groups, scores and ranks of the shards) and returns a
  :class:`LossOutput`. A loss *declares* what it needs (class attributes
  ``reference_free``, ``average_logps``, ``needs``, ``extra_inputs``) and the module
  computes exactly that: no reference pass for a reference-free loss, per-token
  log-probs only for LD-DPO, etc.
* ``forward`` of the pairwise losses (:class:`PairwiseLoss`) keeps the classic
  ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> (losses,
  chosen_rewards, rejected_rewards)`` form on ``[B]`` tensors, for direct use.

Conventions shared by all losses
--------------------------------
* Per-pair ``losses`` are not reduced; :meth:`PairwiseLoss.batch_loss` takes their
  (weighted) mean.
* ``chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)`` and the
  same for rejected, **detached** (they are metrics, never part of the graph).
  For a reference-free loss the reference terms are taken as zero.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "LossBatch",
    "LossOutput",
    "PairwiseLoss",
    "PreferenceLoss",
    "check_beta",
    "check_non_negative",
    "check_unit_interval",
]


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


@dataclass
class LossBatch:
    """Everything a loss may use for one batch of groups (``N`` responses, ``P`` pairs, ``G`` groups).

    Per response (row): ``policy_logps`` (summed over the response tokens, with gradient),
    ``n_tokens``, ``ref_logps`` (summed, ``None`` for reference-free losses), and when a loss
    ``needs`` them: ``token_logps`` / ``ref_token_logps`` (``[N, R]`` per-token log-probs, zero
    past each response's end; LD-DPO), ``log_sum_sq_probs`` (``[N]``: sum over the response
    positions of ``log sum_v p(v)^2``, no gradient; WPO), ``scores`` (``[N]`` the shard's mean
    score of each response, ``nan`` if unrated), ``strength`` (``[N]`` its Bradley-Terry strength),
    ``labels`` (``[N]`` 1 desirable / 0 undesirable / -1 unused, from ``--data.unpaired``; KTO),
    ``kl_policy_logps`` / ``kl_ref_logps`` (summed log-probs of mismatched prompt/response pairs; KTO).

    Per pair: ``chosen`` / ``rejected`` (rows), ``pair_group``, ``probability`` and ``margin``
    (``nan`` when absent). ``row_group`` is the group of each row. ``extra`` holds per-pair
    inputs computed by the module for ``extra_inputs`` (mDPO's corrupted-image log-probs).
    """

    policy_logps: Tensor
    n_tokens: Tensor
    ref_logps: Tensor | None
    chosen: Tensor
    rejected: Tensor
    row_group: Tensor
    pair_group: Tensor | None = None
    probability: Tensor | None = None
    margin: Tensor | None = None
    scores: Tensor | None = None
    strength: Tensor | None = None
    labels: Tensor | None = None
    token_logps: Tensor | None = None
    ref_token_logps: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    kl_policy_logps: Tensor | None = None
    kl_ref_logps: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return int(self.row_group.max()) + 1 if self.row_group.numel() else 0


@dataclass
class LossOutput:
    """``loss`` (scalar, what is optimised); ``losses`` (the per-unit values it averages: per pair,
    per group or per response); per-pair ``chosen_rewards`` / ``rejected_rewards`` (detached,
    for the reward metrics) and ``chosen_logps`` / ``rejected_logps`` (the values the loss used)."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor


def mean_logps(sums: Tensor, n_tokens: Tensor) -> Tensor:
    """Length-averaged log-probs ``sums / n_tokens`` (``n_tokens`` clamped to >= 1)."""
    return sums / n_tokens.clamp(min=1).to(sums.dtype)


class PreferenceLoss(nn.Module, abc.ABC):
    """Abstract base of a preference loss.

    Subclasses hold hyper-parameters (and at most running statistics as buffers, which are
    saved in checkpoints), never trainable parameters.

    Class attributes a loss declares, read by the module:
        reference_free: ``True`` when the loss uses no reference model: the module then makes
            no reference forward, builds no reference copy and opens no reference cache.
        needs: Optional per-row inputs of :class:`LossBatch` (``"token_logps"``,
            ``"ref_token_logps"``, ``"log_sum_sq_probs"``, ``"labels"``, ``"kl_logps"``, ``"scores"``).
        extra_inputs: Per-pair keyword inputs of ``forward`` beyond the four log-prob tensors
            that only the module can compute (mDPO's corrupted-image log-probs).

    Attributes:
        beta: Temperature applied to the log-ratios and to the reported rewards.
        average_logps: Whether the loss works on length-averaged response log-probs
            (``sum / n_tokens``) instead of summed ones.
    """

    reference_free: bool = False
    needs: frozenset[str] = frozenset()
    extra_inputs: frozenset[str] = frozenset()
    #: The default of ``average_logps`` (IPO, SimPO, ORPO: True).
    default_average_logps: bool = False

    def __init__(self, beta: float = 0.1, average_logps: bool | None = None) -> None:
        super().__init__()
        self.beta = check_beta(beta)
        self.average_logps = self.default_average_logps if average_logps is None else bool(average_logps)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"

    def required_inputs(self) -> frozenset[str]:
        """The optional :class:`LossBatch` inputs this instance needs (``needs`` plus what its options add)."""
        return frozenset(self.needs)

    # -- helpers shared by subclasses -------------------------------------------------
    def row_values(self, sums: Tensor, n_tokens: Tensor) -> Tensor:
        """Per-row log-probs as this loss uses them (summed or length-averaged)."""
        return mean_logps(sums, n_tokens) if self.average_logps else sums

    def row_log_ratios(self, b: LossBatch) -> Tensor:
        """``[N]`` policy - reference log-probs per row (policy alone when reference-free)."""
        pol = self.row_values(b.policy_logps, b.n_tokens)
        if self.reference_free or b.ref_logps is None:
            if not self.reference_free:
                raise ValueError(f"{type(self).__name__} needs reference log-probs (reference_free=False)")
            return pol
        return pol - self.row_values(b.ref_logps, b.n_tokens)

    def pair_rewards(self, b: LossBatch, ratios: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Detached implicit rewards ``beta * log-ratio`` of every pair's chosen and rejected row."""
        ratios = self.row_log_ratios(b) if ratios is None else ratios
        r = (self.beta * ratios).detach()
        return r[b.chosen], r[b.rejected]

    def _output(self, b: LossBatch, loss: Tensor, losses: Tensor, ratios: Tensor | None = None) -> LossOutput:
        cr, rr = self.pair_rewards(b, ratios)
        pol = self.row_values(b.policy_logps, b.n_tokens).detach()
        return LossOutput(loss, losses, cr, rr, pol[b.chosen], pol[b.rejected])

    # -- interface --------------------------------------------------------------------
    @abc.abstractmethod
    def batch_loss(self, b: LossBatch) -> LossOutput:
        """The loss of a batch (see :class:`LossBatch` / :class:`LossOutput`)."""


PairWeighting = Literal["none", "wpo", "probability", "margin"]


class PairwiseLoss(PreferenceLoss):
    """Base of the losses built from one term per preference pair.

    The options shared by every pairwise loss live here:

    * **Per-pair weights** (``pair_weighting``), the loss being the weighted mean over pairs:
      ``"wpo"`` — WPO (Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization",
      arXiv:2406.11827, Eq. 2 with its weight alignment, as TRL's ``use_weighting``): the product
      of the chosen and rejected responses' ``exp(mean_t [log p(y_t) - log sum_v p(v)^2])`` under
      the policy, no gradient; ``"probability"`` — the pair's Bradley-Terry probability from the
      shard; ``"margin"`` — the pair's score margin from the shard. A pair without the value
      (``nan``) gets weight 1.
    * **Margin-scaled beta** (``beta_margin_scale`` = gamma): pair ``i`` uses
      ``beta * (1 + gamma * margin_i)`` (margin from the shard, ``nan`` -> 0), so pairs whose
      scores differ more are pushed harder. Rewards are still reported with ``beta``.
    * **LD-DPO** (``ld_alpha``; Liu et al., "LD-DPO: Length Desensitization in Direct Preference
      Optimization", arXiv:2409.06411, Eq. 9, as TRL's ``ld_alpha``): on summed log-probs, the
      tokens beyond the shorter response of each pair count with weight ``alpha`` in [0, 1]
      (policy and reference alike); ``1`` = plain sums.

    Subclasses implement :meth:`pair_loss` on log-ratios.

    Args:
        beta: Inverse temperature of the implicit reward, > 0.
        average_logps: Use length-averaged log-probs; ``None`` = the loss's default.
        pair_weighting: ``"none"``, ``"wpo"``, ``"probability"`` or ``"margin"`` (see above).
        beta_margin_scale: gamma >= 0 of the margin-scaled beta (0 = constant beta).
        ld_alpha: LD-DPO weight of the tokens past the shorter response, in [0, 1];
            ``None`` = off. Needs summed log-probs.
    """

    def __init__(
        self,
        beta: float = 0.1,
        average_logps: bool | None = None,
        pair_weighting: PairWeighting = "none",
        beta_margin_scale: float = 0.0,
        ld_alpha: float | None = None,
    ) -> None:
        super().__init__(beta, average_logps)
        if pair_weighting not in ("none", "wpo", "probability", "margin"):
            raise ValueError(f"pair_weighting must be 'none', 'wpo', 'probability' or 'margin', got {pair_weighting!r}")
        self.pair_weighting = pair_weighting
        self.beta_margin_scale = check_non_negative(beta_margin_scale, "beta_margin_scale")
        if ld_alpha is not None:
            ld_alpha = check_unit_interval(ld_alpha, "ld_alpha", 1.0, upper_inclusive=True)
            if self.average_logps:
                raise ValueError("ld_alpha (LD-DPO) works on summed log-probs: set average_logps false")
        self.ld_alpha = ld_alpha

    def required_inputs(self) -> frozenset[str]:
        needs = set(self.needs)
        if self.ld_alpha is not None:
            needs |= {"token_logps", "ref_token_logps"}
        if self.pair_weighting == "wpo":
            needs.add("log_sum_sq_probs")
        return frozenset(needs)

    def extra_repr(self) -> str:
        parts = [f"beta={self.beta}", f"average_logps={self.average_logps}"]
        if self.pair_weighting != "none":
            parts.append(f"pair_weighting={self.pair_weighting}")
        if self.beta_margin_scale:
            parts.append(f"beta_margin_scale={self.beta_margin_scale}")
        if self.ld_alpha is not None:
            parts.append(f"ld_alpha={self.ld_alpha}")
        return ", ".join(parts)

    # -- per-pair formula ---------------------------------------------------------------
    @abc.abstractmethod
    def pair_loss(self, chosen: Tensor, rejected: Tensor, beta: Tensor | float, **extra: Tensor) -> Tensor:
        """``[P]`` per-pair losses from the chosen / rejected log-ratios (policy - reference).

        ``beta`` is ``self.beta`` or a ``[P]`` tensor (margin-scaled beta).
        """

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

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None,
        ref_rejected_logps: Tensor | None,
        **extra: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair losses on ``[B]`` sequence log-probs (already summed or averaged by the caller).

        Args:
            policy_chosen_logps: ``[B]`` log-probs of the chosen responses under the policy.
            policy_rejected_logps: ``[B]`` log-probs of the rejected responses under the policy.
            ref_chosen_logps: ``[B]`` same under the frozen reference model
                (``None`` only for reference-free losses).
            ref_rejected_logps: ``[B]`` same under the frozen reference model.
            **extra: The loss's ``extra_inputs`` (keyword, ``[B]`` each).

        Returns:
            ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``;
            ``losses`` is per pair (reduce with ``.mean()``), rewards are detached.
        """
        chosen, rejected = self.log_ratios(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
        losses = self.pair_loss(chosen, rejected, self.beta, **extra)
        return (losses, *self.rewards(chosen, rejected))

    # -- batch entry point --------------------------------------------------------------------
    def pair_extras(self, b: LossBatch, chosen_values: Tensor) -> dict[str, Tensor]:
        """Keyword inputs of :meth:`pair_loss` taken from the batch (default: ``b.extra``)."""
        return dict(b.extra)

    def pair_values(self, sums: Tensor, tokens: Tensor | None, b: LossBatch) -> tuple[Tensor, Tensor]:
        """``(chosen, rejected)`` per-pair log-probs: summed, averaged, or LD-DPO-weighted."""
        if self.ld_alpha is None:
            values = self.row_values(sums, b.n_tokens)
            return values[b.chosen], values[b.rejected]
        if tokens is None:
            raise ValueError(f"ld_alpha needs per-token log-probs ({type(self).__name__}.needs)")
        return ld_logps(tokens, b.n_tokens, b.chosen, b.rejected, self.ld_alpha)

    def pair_weights(self, b: LossBatch) -> Tensor | None:
        """``[P]`` weights of the pairs, or ``None`` for an unweighted mean."""
        if self.pair_weighting == "none":
            return None
        if self.pair_weighting == "wpo":
            if b.log_sum_sq_probs is None:
                raise ValueError("pair_weighting='wpo' needs log_sum_sq_probs from the module")
            with torch.no_grad():
                aligned = torch.exp((b.policy_logps.detach() - b.log_sum_sq_probs) / b.n_tokens.clamp(min=1))
            return aligned[b.chosen] * aligned[b.rejected]
        values = b.probability if self.pair_weighting == "probability" else b.margin
        if values is None:
            raise ValueError(f"pair_weighting={self.pair_weighting!r} needs the pairs' {self.pair_weighting} from the data")
        return torch.nan_to_num(values.to(b.policy_logps.dtype), nan=1.0)

    def pair_beta(self, b: LossBatch) -> Tensor | float:
        if not self.beta_margin_scale:
            return self.beta
        if b.margin is None:
            raise ValueError("beta_margin_scale needs the pairs' score margins from the data")
        margin = torch.nan_to_num(b.margin.to(b.policy_logps.dtype), nan=0.0)
        return self.beta * (1.0 + self.beta_margin_scale * margin)

    def batch_loss(self, b: LossBatch) -> LossOutput:
        pc, pr = self.pair_values(b.policy_logps, b.token_logps, b)
        if self.reference_free:
            rc = rr = None
        else:
            if b.ref_logps is None:
                raise ValueError(f"{type(self).__name__} needs reference log-probs (reference_free=False)")
            rc, rr = self.pair_values(b.ref_logps, b.ref_token_logps, b)
        chosen, rejected = self.log_ratios(pc, pr, rc, rr)
        losses = self.pair_loss(chosen, rejected, self.pair_beta(b), **self.pair_extras(b, pc))
        weights = self.pair_weights(b)
        loss = losses.mean() if weights is None else (weights * losses).sum() / losses.numel()
        cr, rj = self.rewards(chosen, rejected)
        return LossOutput(loss, losses, cr, rj, pc.detach(), pr.detach())


def ld_logps(tokens: Tensor, n_tokens: Tensor, chosen: Tensor, rejected: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO per-pair log-probs (arXiv 2409.06411, Eq. 9): the first ``min(|y_w|, |y_l|)`` tokens
    in full, the rest of the longer response weighted by ``alpha``.

    ``tokens`` is ``[N, R]`` per-token log-probs (zero past each row's end), ``n_tokens`` ``[N]``.
    """
    shared = torch.minimum(n_tokens[chosen], n_tokens[rejected])  # [P]
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    head = (cols[None, :] < shared[:, None]).to(tokens.dtype)  # [P, R]

    def one(rows: Tensor) -> Tensor:
        t = tokens[rows]
        full = t.sum(dim=1)
        head_sum = (t * head).sum(dim=1)
        return head_sum + alpha * (full - head_sum)

    return one(chosen), one(rejected)

