"""Preference losses: hand-worked values, TRL parity, argument checks.

TRL 1.x has no standalone ``dpo_loss`` function any more: the per-pair
formulas live inline in ``DPOTrainer._compute_loss``. The TRL comparisons
below therefore call that very method (unbound) on a minimal stand-in
``self`` and a fake model whose per-token log-probs sum to the sequence
log-probs under test, with ``precompute_ref_log_probs`` so the reference
log-probs come from the inputs. Only the attributes that method reads are
provided; if a TRL release renames them the harness fails loudly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vpa_lightning.losses import (
    DPOLoss,
    HingeLoss,
    IPOLoss,
    MDPOLoss,
    PreferenceLoss,
    RobustDPOLoss,
    RPOLoss,
)

# --- small helpers -------------------------------------------------------------------


def logsig(x: float) -> float:
    """log(sigmoid(x)) by hand."""
    return -math.log1p(math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# one fixed batch of 3 pairs: policy chosen/rejected, reference chosen/rejected
PC = t(-10.0, -4.0, -7.5)
PR = t(-12.0, -3.0, -7.5)
RC = t(-11.0, -4.5, -6.0)
RR = t(-11.5, -3.5, -8.0)
# margins h = (pc - rc) - (pr - rr) = (1 - (-0.5), 0.5 - 0.5, -1.5 - 0.5) = (1.5, 0.0, -2.0)
H = [1.5, 0.0, -2.0]


def random_batch(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(-20.0 * torch.rand(b, generator=g, dtype=torch.float64) for _ in range(4))


def trl_loss(
    loss_types: list[str],
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
    lengths: list[int] | None = None,
) -> torch.Tensor:
    """Scalar loss of TRL's ``DPOTrainer._compute_loss`` for given sequence log-probs."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    b = pc.shape[0]
    lengths = lengths or [1] * (2 * b)
    seq = max(lengths) + 1
    completion_mask = torch.zeros(2 * b, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, 1 : 1 + n] = 1
    shift_mask = completion_mask[:, 1:].to(pc.dtype)
    per_seq = torch.cat([pc, pr])
    n = torch.tensor(lengths, dtype=pc.dtype)
    per_token = shift_mask * (per_seq / n)[:, None]  # sums back to per_seq; zero off the completion
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    fake_self = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, seq, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(fake_self, lambda **_: outputs, inputs, False)
    return torch.as_tensor(loss, dtype=pc.dtype)


# --- interface -----------------------------------------------------------------------

ALL = [DPOLoss, IPOLoss, HingeLoss, RobustDPOLoss, RPOLoss, MDPOLoss]


def extra_inputs(cls: type, pc: torch.Tensor) -> dict[str, torch.Tensor]:
    if cls is RPOLoss:
        return {"chosen_nll": torch.full_like(pc, 0.7)}
    if cls is MDPOLoss:
        return {"policy_corrupted_chosen_logps": pc - 1.0, "ref_corrupted_chosen_logps": pc - 0.5}
    return {}


@pytest.mark.parametrize("cls", ALL)
def test_interface_shapes_rewards_and_grad(cls: type) -> None:
    loss_fn = cls(beta=0.2)
    assert isinstance(loss_fn, PreferenceLoss) and not loss_fn.reference_free
    pc = PC.clone().requires_grad_(True)
    losses, cr, rj = loss_fn(pc, PR, RC, RR, **extra_inputs(cls, PC))
    assert losses.shape == cr.shape == rj.shape == (3,)
    assert not cr.requires_grad and not rj.requires_grad
    torch.testing.assert_close(cr, 0.2 * (PC - RC))
    torch.testing.assert_close(rj, 0.2 * (PR - RR))
    losses.mean().backward()
    assert pc.grad is not None and torch.isfinite(pc.grad).all()


@pytest.mark.parametrize("cls", ALL)
def test_reference_required(cls: type) -> None:
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        cls()(PC, PR, None, RR, **extra_inputs(cls, PC))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta(cls: type, beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        cls(beta=beta)


@pytest.mark.parametrize(
    "cls,kwargs,name",
    [
        (DPOLoss, {"label_smoothing": -0.1}, "label_smoothing"),
        (DPOLoss, {"label_smoothing": 0.6}, "label_smoothing"),
        (RobustDPOLoss, {"label_smoothing": 0.5}, "label_smoothing"),
        (RPOLoss, {"alpha": -1.0}, "alpha"),
        (MDPOLoss, {"conditional_weight": -1.0}, "conditional_weight"),
        (MDPOLoss, {"anchor_weight": float("nan")}, "anchor_weight"),
        (MDPOLoss, {"anchor": float("inf")}, "anchor"),
    ],
)
def test_bad_arguments(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_shape_mismatch_and_missing_extras() -> None:
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        DPOLoss()(PC, PR[:2], RC, RR)
    with pytest.raises(ValueError, match="chosen_nll"):
        RPOLoss()(PC, PR, RC, RR, chosen_nll=None)
    with pytest.raises(TypeError):
        RPOLoss()(PC, PR, RC, RR)  # keyword is mandatory
    with pytest.raises(ValueError, match="ref_corrupted_chosen_logps"):
        MDPOLoss()(PC, PR, RC, RR, policy_corrupted_chosen_logps=PC, ref_corrupted_chosen_logps=PC[:1])


# --- hand-worked values -------------------------------------------------------------


def test_dpo_by_hand() -> None:
    beta = 0.5
    losses, _, _ = DPOLoss(beta=beta)(PC, PR, RC, RR)
    expected = [-logsig(beta * h) for h in H]  # h=0 gives log 2
    assert expected[1] == pytest.approx(math.log(2.0))
    torch.testing.assert_close(losses, t(*expected))


def test_cdpo_by_hand() -> None:
    beta, eps = 0.5, 0.2
    losses, _, _ = DPOLoss(beta=beta, label_smoothing=eps)(PC, PR, RC, RR)
    expected = [-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in H]
    torch.testing.assert_close(losses, t(*expected))
    # eps = 0.5 makes the loss symmetric: constant in h's sign
    sym, _, _ = DPOLoss(beta=beta, label_smoothing=0.5)(PC, PR, RC, RR)
    torch.testing.assert_close(sym, t(*[-0.5 * (logsig(beta * h) + logsig(-beta * h)) for h in H]))


def test_ipo_by_hand() -> None:
    beta = 0.25  # target margin 1 / (2 beta) = 2
    losses, _, _ = IPOLoss(beta=beta)(PC, PR, RC, RR)
    torch.testing.assert_close(losses, t((1.5 - 2) ** 2, (0.0 - 2) ** 2, (-2.0 - 2) ** 2))


def test_hinge_by_hand() -> None:
    beta = 0.5
    losses, _, _ = HingeLoss(beta=beta)(PC, PR, RC, RR)
    torch.testing.assert_close(losses, t(1 - 0.75, 1.0, 2.0))
    big, _, _ = HingeLoss(beta=1.0)(PC, PR, RC, RR)  # margin 1.5 > 1: zero loss
    assert big[0].item() == 0.0


def test_robust_by_hand() -> None:
    beta, eps = 0.5, 0.2
    losses, _, _ = RobustDPOLoss(beta=beta, label_smoothing=eps)(PC, PR, RC, RR)
    expected = [(-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps) for h in H]
    torch.testing.assert_close(losses, t(*expected))
    # unbiasedness: averaging over the label noise recovers plain DPO
    flipped, _, _ = RobustDPOLoss(beta=beta, label_smoothing=eps)(PR, PC, RR, RC)
    plain, _, _ = DPOLoss(beta=beta)(PC, PR, RC, RR)
    torch.testing.assert_close((1 - eps) * losses + eps * flipped, plain)


def test_rpo_by_hand() -> None:
    beta, alpha = 0.5, 2.0
    nll = t(0.3, 1.0, 2.5)
    losses, _, _ = RPOLoss(beta=beta, alpha=alpha)(PC, PR, RC, RR, chosen_nll=nll)
    expected = [-logsig(beta * h) + alpha * n for h, n in zip(H, [0.3, 1.0, 2.5])]
    torch.testing.assert_close(losses, t(*expected))
    plain, _, _ = RPOLoss(beta=beta, alpha=0.0)(PC, PR, RC, RR, chosen_nll=nll)
    torch.testing.assert_close(plain, DPOLoss(beta=beta)(PC, PR, RC, RR)[0])


def test_mdpo_by_hand() -> None:
    beta = 0.5
    pcc, rcc = t(-13.0, -4.0, -9.0), t(-12.0, -5.0, -8.0)  # corrupted-image chosen log-probs
    chosen_ratio = [1.0, 0.5, -1.5]
    corrupted_ratio = [-1.0, 1.0, -1.0]
    losses, _, _ = MDPOLoss(beta=beta)(
        PC, PR, RC, RR, policy_corrupted_chosen_logps=pcc, ref_corrupted_chosen_logps=rcc
    )
    expected = [
        -logsig(beta * h) - logsig(beta * (c - k)) - logsig(beta * c)
        for h, c, k in zip(H, chosen_ratio, corrupted_ratio)
    ]
    torch.testing.assert_close(losses, t(*expected))
    # weights and anchor
    w, _, _ = MDPOLoss(beta=beta, conditional_weight=0.5, anchor_weight=2.0, anchor=0.3)(
        PC, PR, RC, RR, policy_corrupted_chosen_logps=pcc, ref_corrupted_chosen_logps=rcc
    )
    expected_w = [
        -logsig(beta * h) - 0.5 * logsig(beta * (c - k)) - 2.0 * logsig(beta * c - 0.3)
        for h, c, k in zip(H, chosen_ratio, corrupted_ratio)
    ]
    torch.testing.assert_close(w, t(*expected_w))
    # no conditional / anchor terms: plain DPO
    zero, _, _ = MDPOLoss(beta=beta, conditional_weight=0.0, anchor_weight=0.0)(
        PC, PR, RC, RR, policy_corrupted_chosen_logps=pcc, ref_corrupted_chosen_logps=rcc
    )
    torch.testing.assert_close(zero, DPOLoss(beta=beta)(PC, PR, RC, RR)[0])


# --- parity with TRL ------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(beta: float) -> None:
    batch = random_batch()
    ours = DPOLoss(beta=beta)(*batch)[0].mean()
    torch.testing.assert_close(ours, trl_loss(["sigmoid"], *batch, beta=beta))


def test_cdpo_matches_trl_aot_single_pair() -> None:
    # TRL 1.x dropped label smoothing from its "sigmoid" loss; its "aot" loss keeps the
    # cDPO formula on sorted margins, which for a single pair is exactly cDPO.
    beta, eps = 0.3, 0.15
    for pc, pr, rc, rr in zip(*random_batch(4, seed=1)):
        one = tuple(x.reshape(1) for x in (pc, pr, rc, rr))
        ours = DPOLoss(beta=beta, label_smoothing=eps)(*one)[0].mean()
        torch.testing.assert_close(ours, trl_loss(["aot"], *one, beta=beta, label_smoothing=eps))


def test_ipo_matches_trl_with_length_average() -> None:
    # TRL's IPO divides the summed log-ratios by the completion length; ours expects averaged log-probs.
    beta = 0.2
    pc, pr, rc, rr = random_batch(4, seed=2)
    lengths = [3, 5, 2, 7, 4, 1, 6, 2]  # chosen lengths, then rejected lengths
    nc, nr = t(*lengths[:4]), t(*lengths[4:])
    ours = IPOLoss(beta=beta)(pc / nc, pr / nr, rc / nc, rr / nr)[0].mean()
    torch.testing.assert_close(ours, trl_loss(["ipo"], pc, pr, rc, rr, beta=beta, lengths=lengths))


def test_hinge_matches_trl() -> None:
    beta = 0.4
    batch = random_batch(seed=3)
    ours = HingeLoss(beta=beta)(*batch)[0].mean()
    torch.testing.assert_close(ours, trl_loss(["hinge"], *batch, beta=beta))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_matches_trl(eps: float) -> None:
    beta = 0.25
    batch = random_batch(seed=4)
    ours = RobustDPOLoss(beta=beta, label_smoothing=eps)(*batch)[0].mean()
    torch.testing.assert_close(ours, trl_loss(["robust"], *batch, beta=beta, label_smoothing=eps))


def test_rpo_matches_trl_sigmoid_plus_sft() -> None:
    # TRL 1.x expresses RPO as loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]; its "sft" term is the
    # mean NLL over all chosen tokens of the batch, which equals the mean of per-pair length-normalised NLLs
    # when the chosen responses have equal length (used here).
    beta, alpha = 0.1, 0.7
    pc, pr, rc, rr = random_batch(4, seed=5)
    lengths = [3, 3, 3, 3, 2, 5, 4, 1]
    ours = RPOLoss(beta=beta, alpha=alpha)(pc, pr, rc, rr, chosen_nll=-pc / 3.0)[0].mean()
    ref = trl_loss(["sigmoid", "sft"], pc, pr, rc, rr, beta=beta, loss_weights=[1.0, alpha], lengths=lengths)
    torch.testing.assert_close(ours, ref)


def test_mdpo_matches_trl_terms() -> None:
    # TRL has no mDPO; rebuild its three terms from TRL losses: "sigmoid" for the response preference,
    # "sigmoid" with the corrupted-image chosen as "rejected" for the image-conditional term, and
    # "bco_pair" with a hugely negative rejected ratio (its second term vanishes) for the anchor,
    # the anchor delta folded into the reference log-prob (-logsig(b*r - d) = -logsig(b*(r - d/b))).
    beta, anchor = 0.3, 0.2
    pc, pr, rc, rr = random_batch(5, seed=6)
    pcc, rcc = random_batch(5, seed=7)[:2]
    ours = MDPOLoss(beta=beta, conditional_weight=0.5, anchor_weight=1.5, anchor=anchor)(
        pc, pr, rc, rr, policy_corrupted_chosen_logps=pcc, ref_corrupted_chosen_logps=rcc
    )[0].mean()
    dpo = trl_loss(["sigmoid"], pc, pr, rc, rr, beta=beta)
    cond = trl_loss(["sigmoid"], pc, pcc, rc, rcc, beta=beta)
    huge = torch.full_like(pc, 1e6)
    anc = trl_loss(["bco_pair"], pc, -huge, rc + anchor / beta, torch.zeros_like(pc), beta=beta)
    torch.testing.assert_close(ours, dpo + 0.5 * cond + 1.5 * anc)
