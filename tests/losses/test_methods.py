"""Preference methods of issue 14 (and IPO/RPO of issue 12): hand-worked values and TRL parity.

TRL 1.16 keeps its DPO-family formulas inline in ``DPOTrainer._compute_loss``; as in
``test_losses.py`` that method is called unbound on a stand-in ``self`` and a fake model whose
per-token log-probs are given, so the comparison runs TRL's own code on the same inputs
(``ld_alpha``, ``use_weighting`` with ``log_sum_sq_probs`` and the ``sft`` term included).
SimPO and ORPO are compared with ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss``.
KTO's loss and the BCO reward shift are inline in trainers that cannot be called this way; their
formulas are transcribed below with the file they come from.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vpa_lightning.losses import (
    APODownLoss,
    APOZeroLoss,
    BCOPairLoss,
    CombinedLoss,
    DPOLoss,
    EXOLoss,
    IPOLoss,
    KTOLoss,
    LiPOLambdaLoss,
    LossBatch,
    NCALoss,
    ORPOLoss,
    PlackettLuceLoss,
    RPOLoss,
    SFTLoss,
    SimPOLoss,
    SPPOHardLoss,
)

F = torch.nn.functional


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- a batch of B pairs given per token: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] ---


def token_batch(b: int = 4, seed: int = 0, ref: bool = True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (2 * b,), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).double()
    pol = -3.0 * torch.rand(2 * b, width, generator=g, dtype=torch.float64) * mask
    refs = -3.0 * torch.rand(2 * b, width, generator=g, dtype=torch.float64) * mask
    # log sum_v p^2 <= max log p: any values below the token log-probs will do for the harness
    sq = (pol - 0.5 * torch.rand(2 * b, width, generator=g, dtype=torch.float64)) * mask
    return pol, refs, sq, lengths, mask


def loss_batch(pol, refs, lengths, *, sq=None, probability=None, margin=None, with_ref=True) -> LossBatch:
    n = pol.shape[0]
    b = n // 2
    return LossBatch(
        policy_logps=pol.sum(1),
        n_tokens=lengths,
        ref_logps=refs.sum(1) if with_ref else None,
        chosen=torch.arange(b),
        rejected=torch.arange(b) + b,
        row_group=torch.arange(n) % b,
        pair_group=torch.arange(b),
        probability=probability,
        margin=margin,
        token_logps=pol,
        ref_token_logps=refs,
        log_sum_sq_probs=None if sq is None else sq.sum(1),
    )


def _train_module() -> torch.nn.Module:
    module = torch.nn.Module()  # TRL inspects it (PEFT? gradient checkpointing?) before the reference pass
    module.is_gradient_checkpointing = False
    return module


def trl_dpo(loss_types, pol, refs, mask, *, beta, label_smoothing=0.0, loss_weights=None, ld_alpha=None, sq=None):
    """TRL's ``DPOTrainer._compute_loss`` on per-token log-probs ``pol`` ``[2B, R]`` (and reference ``refs``)."""
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    n, width = pol.shape
    completion_mask = torch.cat([torch.zeros(n, 1, dtype=torch.long), mask.long()], dim=1)  # token t predicted at t-1
    outputs = SimpleNamespace(
        log_probs=pol,
        entropy=torch.zeros_like(pol),
        mean_logits=torch.zeros_like(pol),
        is_top1=torch.zeros_like(pol, dtype=torch.bool),
        log_sum_sq_probs=sq if sq is not None else torch.zeros_like(pol),
    )
    ref_outputs = SimpleNamespace(log_probs=refs)

    def model(**kwargs):
        return outputs

    fake_self = SimpleNamespace(
        model=_train_module(),
        ref_model=lambda **kwargs: ref_outputs,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=sq is not None,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, gradient_checkpointing=False),
    )
    inputs = {
        "input_ids": torch.zeros(n, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, width + 1, dtype=torch.long),
        "completion_mask": completion_mask,
    }
    loss = dpo_trainer.DPOTrainer._compute_loss(fake_self, model, inputs, False)
    return torch.as_tensor(loss, dtype=pol.dtype)


# --- issue 12: IPO and RPO ------------------------------------------------------------------


def test_ipo_is_length_averaged_by_default_and_matches_trl():
    pol, refs, _, lengths, mask = token_batch(seed=1)
    loss = IPOLoss(beta=0.2)
    assert loss.average_logps
    ours = loss.batch_loss(loss_batch(pol, refs, lengths)).loss
    torch.testing.assert_close(ours, trl_dpo(["ipo"], pol, refs, mask, beta=0.2))
    summed = IPOLoss(beta=0.2, average_logps=False).batch_loss(loss_batch(pol, refs, lengths)).loss
    assert not torch.allclose(summed, ours)  # told otherwise: summed log-probs


def test_rpo_token_mean_nll_matches_trl_with_unequal_lengths():
    pol, refs, _, lengths, mask = token_batch(seed=2)
    b = loss_batch(pol, refs, lengths)
    assert len(set(lengths[:4].tolist())) > 1  # the case where per-sequence and token means differ
    token = RPOLoss(beta=0.1, alpha=0.7, nll_reduction="token").batch_loss(b).loss
    ref = trl_dpo(["sigmoid", "sft"], pol, refs, mask, beta=0.1, loss_weights=[1.0, 0.7])
    torch.testing.assert_close(token, ref)
    sequence = RPOLoss(beta=0.1, alpha=0.7).batch_loss(b).loss
    assert abs(float(sequence - ref)) > 1e-4
    nll_seq = (-pol.sum(1)[:4] / lengths[:4]).mean()
    dpo = DPOLoss(beta=0.1).batch_loss(b).loss
    torch.testing.assert_close(sequence, dpo + 0.7 * nll_seq)


# --- pairwise losses against TRL's own code -----------------------------------------------------

PAIRWISE_TRL = [
    (lambda: APOZeroLoss(beta=0.3), ["apo_zero"], {}),
    (lambda: APODownLoss(beta=0.3), ["apo_down"], {}),
    (lambda: EXOLoss(beta=0.3, epsilon=1e-3), ["exo_pair"], {"label_smoothing": 1e-3}),
    (lambda: NCALoss(beta=0.3), ["nca_pair"], {}),
    (lambda: SPPOHardLoss(beta=0.3), ["sppo_hard"], {}),
    (lambda: BCOPairLoss(beta=0.3, shift=False), ["bco_pair"], {}),
]


@pytest.mark.parametrize("make,types,kwargs", PAIRWISE_TRL, ids=lambda x: x[0] if isinstance(x, list) else "")
def test_pairwise_losses_match_trl(make, types, kwargs):
    pol, refs, _, lengths, mask = token_batch(seed=3)
    ours = make().batch_loss(loss_batch(pol, refs, lengths)).loss
    torch.testing.assert_close(ours, trl_dpo(types, pol, refs, mask, beta=0.3, **kwargs))


def test_wpo_weights_match_trl():
    pol, refs, sq, lengths, mask = token_batch(seed=4)
    loss = DPOLoss(beta=0.2, pair_weighting="wpo")
    assert "log_sum_sq_probs" in loss.required_inputs()
    ours = loss.batch_loss(loss_batch(pol, refs, lengths, sq=sq)).loss
    torch.testing.assert_close(ours, trl_dpo(["sigmoid"], pol, refs, mask, beta=0.2, sq=sq))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ld_dpo_matches_trl(alpha):
    pol, refs, _, lengths, mask = token_batch(seed=5)
    loss = DPOLoss(beta=0.2, ld_alpha=alpha)
    assert {"token_logps", "ref_token_logps"} <= loss.required_inputs()
    ours = loss.batch_loss(loss_batch(pol, refs, lengths)).loss
    torch.testing.assert_close(ours, trl_dpo(["sigmoid"], pol, refs, mask, beta=0.2, ld_alpha=alpha))
    if alpha == 1.0:
        torch.testing.assert_close(ours, DPOLoss(beta=0.2).batch_loss(loss_batch(pol, refs, lengths)).loss)
    with pytest.raises(ValueError, match="ld_alpha"):
        IPOLoss(ld_alpha=0.5)  # averaged log-probs


def test_mpo_combination_matches_trl():
    pol, refs, _, lengths, mask = token_batch(seed=6)
    mpo = CombinedLoss([DPOLoss(beta=0.1), BCOPairLoss(beta=0.1, shift=False), SFTLoss()], weights=[0.8, 0.2, 1.0])
    ours = mpo.batch_loss(loss_batch(pol, refs, lengths)).loss
    ref = trl_dpo(["sigmoid", "bco_pair", "sft"], pol, refs, mask, beta=0.1, loss_weights=[0.8, 0.2, 1.0])
    torch.testing.assert_close(ours, ref)
    assert not mpo.reference_free
    assert CombinedLoss([SimPOLoss(), SFTLoss()]).reference_free


def test_simpo_matches_trl_cpo():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    pol, refs, _, lengths, mask = token_batch(seed=7)
    loss = SimPOLoss(beta=2.0, gamma=1.2)
    assert loss.reference_free and loss.average_logps
    b = loss_batch(pol, refs, lengths, with_ref=False)
    out = loss.batch_loss(b)
    avg = pol.sum(1) / lengths
    fake = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=1.2, label_smoothing=0.0, loss_type="simpo",
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, cr, rr = cpo.CPOTrainer.cpo_loss(fake, avg[:4], avg[4:])
    torch.testing.assert_close(out.losses, losses)
    torch.testing.assert_close(out.chosen_rewards, cr)
    # by hand, pair 0
    assert float(out.losses[0]) == pytest.approx(-logsig(2.0 * float(avg[0] - avg[4]) - 1.2))


def test_orpo_matches_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    pol, refs, _, lengths, mask = token_batch(seed=8)
    loss = ORPOLoss(beta=0.25)
    assert loss.reference_free
    out = loss.batch_loss(loss_batch(pol, refs, lengths, with_ref=False))
    avg = pol.sum(1) / lengths
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, *_ = orpo.ORPOTrainer.odds_ratio_loss(fake, avg[:4], avg[4:])
    nll = -pol[:4].sum() / lengths[:4].sum()  # TRL: mean cross-entropy over the chosen tokens
    torch.testing.assert_close(out.loss, nll - ratio_losses.mean())
    # by hand, pair 0: log odds = log(p/(1-p)) - log(q/(1-q))
    p, q = math.exp(float(avg[0])), math.exp(float(avg[4]))
    log_odds = math.log(p / (1 - p)) - math.log(q / (1 - q))
    assert float(out.losses[0]) == pytest.approx(float(nll) - 0.25 * logsig(log_odds))


# --- hand-worked values ----------------------------------------------------------------------------

PC, PR, RC, RR = t(-10.0, -4.0), t(-12.0, -3.0), t(-11.0, -4.5), t(-11.5, -3.5)
CH, RJ = [1.0, 0.5], [-0.5, 0.5]  # chosen / rejected log-ratios


def test_hand_worked_pair_formulas():
    b = 0.5
    torch.testing.assert_close(
        APOZeroLoss(beta=b)(PC, PR, RC, RR)[0], t(*[1 - sig(b * c) + sig(b * r) for c, r in zip(CH, RJ)])
    )
    torch.testing.assert_close(
        APODownLoss(beta=b)(PC, PR, RC, RR)[0], t(*[sig(b * c) + 1 - sig(b * (c - r)) for c, r in zip(CH, RJ)])
    )
    torch.testing.assert_close(
        NCALoss(beta=b)(PC, PR, RC, RR)[0],
        t(*[-logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r) for c, r in zip(CH, RJ)]),
    )
    torch.testing.assert_close(
        SPPOHardLoss(beta=b)(PC, PR, RC, RR)[0], t(*[(c - 1.0) ** 2 + (r + 1.0) ** 2 for c, r in zip(CH, RJ)])
    )
    eps = 0.1
    exo = []
    for c, r in zip(CH, RJ):
        z = b * (c - r)
        exo.append(sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps)))
    torch.testing.assert_close(EXOLoss(beta=b, epsilon=eps)(PC, PR, RC, RR)[0], t(*exo))


def test_bco_running_shift_by_hand_and_in_state_dict():
    """delta = mean over training steps of each step's mean reward (TRL < 1.0 ``bco_pair`` with
    ``RunningMoments``, trl/trainer/dpo_trainer.py of TRL 0.9-0.19), applied after the update."""
    loss = BCOPairLoss(beta=0.5)
    step1 = [0.5 * x for x in CH + RJ]
    delta1 = sum(step1) / 4
    l1 = loss(PC, PR, RC, RR)[0]
    torch.testing.assert_close(
        l1, t(*[-logsig(0.5 * c - delta1) - logsig(-(0.5 * r - delta1)) for c, r in zip(CH, RJ)])
    )
    loss(PC + 1.0, PR, RC, RR)  # step 2: chosen log-ratios +1
    delta2 = (delta1 + (sum(step1) + 0.5 * 2) / 4) / 2
    assert loss.delta == pytest.approx(delta2)
    loss.eval()
    loss(PC, PR, RC, RR)  # validation does not move the shift
    assert loss.delta == pytest.approx(delta2)
    state = loss.state_dict()
    assert set(state) == {"running_mean", "running_steps"}
    resumed = BCOPairLoss(beta=0.5)
    resumed.load_state_dict(state)
    assert resumed.delta == pytest.approx(delta2) and int(resumed.running_steps) == 2


def test_margin_scaled_beta_and_data_weights_by_hand():
    pol, refs, _, lengths, _ = token_batch(b=2, seed=9)
    margin, prob = t(2.0, float("nan")), t(0.9, 0.6)
    b = loss_batch(pol, refs, lengths, margin=margin, probability=prob)
    c = (pol.sum(1) - refs.sum(1))[:2]
    r = (pol.sum(1) - refs.sum(1))[2:]
    h = (c - r).tolist()
    scaled = DPOLoss(beta=0.1, beta_margin_scale=0.5).batch_loss(b)
    # beta_i = 0.1 * (1 + 0.5 * margin_i); a missing margin counts as 0
    torch.testing.assert_close(scaled.losses, t(-logsig(0.1 * 2.0 * h[0]), -logsig(0.1 * h[1])))
    torch.testing.assert_close(scaled.chosen_rewards, 0.1 * c)  # rewards keep the base beta
    weighted = DPOLoss(beta=0.1, pair_weighting="probability").batch_loss(b)
    assert float(weighted.loss) == pytest.approx((0.9 * -logsig(0.1 * h[0]) + 0.6 * -logsig(0.1 * h[1])) / 2)
    by_margin = DPOLoss(beta=0.1, pair_weighting="margin").batch_loss(b)
    assert float(by_margin.loss) == pytest.approx((2.0 * -logsig(0.1 * h[0]) + 1.0 * -logsig(0.1 * h[1])) / 2)
    with pytest.raises(ValueError, match="pair_weighting"):
        DPOLoss(pair_weighting="inverse")


# --- KTO ---------------------------------------------------------------------------------------------


def kto_batch(labels=None):
    # two groups of 2 responses; rows 0 > 1 in group 0, rows 2 > 3 in group 1
    return LossBatch(
        policy_logps=t(-3.0, -5.0, -2.0, -6.0),
        n_tokens=torch.tensor([3, 4, 2, 5]),
        ref_logps=t(-4.0, -4.0, -2.5, -5.0),
        chosen=torch.tensor([0, 2]),
        rejected=torch.tensor([1, 3]),
        row_group=torch.tensor([0, 0, 1, 1]),
        labels=labels,
        kl_policy_logps=t(-7.0, -6.0, -8.0, -9.0),
        kl_ref_logps=t(-7.5, -6.5, -8.0, -9.2),
    )


def test_kto_by_hand_and_trl_formula():
    """TRL's KTO (trl/trainer/kto_trainer.py, ``loss_type="kto"``): kl = clamp(mean(KL_logps -
    ref_KL_logps), min=0); chosen 1 - sigmoid(beta (r - kl)), rejected 1 - sigmoid(beta (kl - r)),
    weighted, concatenated, averaged."""
    loss = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    out = loss.batch_loss(kto_batch())  # labels from the pairs: rows 0, 2 desirable, 1, 3 undesirable
    z0 = (0.5 + 0.5 + 0.0 + 0.2) / 4
    r = [1.0, -1.0, 0.5, -1.0]
    expected = [1 - sig(0.5 * (r[0] - z0)), 1 - sig(0.5 * (r[2] - z0))]
    expected += [1.5 * (1 - sig(0.5 * (z0 - r[1]))), 1.5 * (1 - sig(0.5 * (z0 - r[3])))]
    torch.testing.assert_close(out.losses, t(*expected))
    assert float(out.loss) == pytest.approx(sum(expected) / 4)
    # explicit labels (e.g. --data.unpaired threshold:X): row 1 unused, row 3 desirable
    out = loss.batch_loss(kto_batch(labels=torch.tensor([1, -1, 0, 1])))
    expected = [1 - sig(0.5 * (r[0] - z0)), 1 - sig(0.5 * (r[3] - z0)), 1.5 * (1 - sig(0.5 * (z0 - r[2])))]
    torch.testing.assert_close(out.losses, t(*expected))
    # negative KL estimate is clamped to 0; without the reference point z0 = 0
    b = kto_batch()
    b.kl_policy_logps = b.kl_ref_logps - 1.0
    assert float(loss.reference_point(b)) == 0.0
    assert KTOLoss(kl_reference_point=False).required_inputs() == {"labels"}


# --- listwise ------------------------------------------------------------------------------------------


def group_batch(pol, ref, keys, groups, pairs):
    chosen, rejected = zip(*pairs)
    return LossBatch(
        policy_logps=t(*pol),
        n_tokens=torch.ones(len(pol), dtype=torch.long),
        ref_logps=t(*ref),
        chosen=torch.tensor(chosen),
        rejected=torch.tensor(rejected),
        row_group=torch.tensor(groups),
        strength=t(*keys),
        scores=t(*keys),
    )


def test_plackett_luce_k2_is_dpo():
    pol, refs, _, lengths, _ = token_batch(b=3, seed=10)
    b = loss_batch(pol, refs, lengths)
    b.strength = t(1.0, 1.0, 1.0, 0.0, 0.0, 0.0)  # every chosen above its rejected
    pl = PlackettLuceLoss(beta=0.3).batch_loss(b)
    dpo = DPOLoss(beta=0.3).batch_loss(b)
    torch.testing.assert_close(pl.losses, dpo.losses)
    torch.testing.assert_close(pl.chosen_rewards, dpo.chosen_rewards)


def test_plackett_luce_by_hand_with_ties():
    # group 0: 3 responses ranked 0 > 1 > 2; group 1: 3 responses, 3 > {4 = 5} (a tie); group 2: all tied
    pol = [-1.0, -2.0, -4.0, -3.0, -1.0, -2.0, -1.0, -2.0]
    ref = [0.0] * 8
    keys = [3.0, 2.0, 1.0, 5.0, 2.0, 2.0, 1.0, 1.0]
    groups = [0, 0, 0, 1, 1, 1, 2, 2]
    b = group_batch(pol, ref, keys, groups, [(0, 1), (1, 2), (0, 2), (3, 4), (3, 5)])
    beta = 1.0
    out = PlackettLuceLoss(beta=beta).batch_loss(b)
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    g0 = -((-1 - lse(-1, -2, -4)) + (-2 - lse(-2, -4)) + 0.0)
    # Breslow: the tied 4 and 5 share the risk set {4, 5}
    g1 = -((-3 - lse(-3, -1, -2)) + (-1 - lse(-1, -2)) + (-2 - lse(-1, -2)))
    torch.testing.assert_close(out.losses, t(g0, g1))  # group 2 (all tied) carries no ranking
    assert float(out.loss) == pytest.approx((g0 + g1) / 2)
    # ranking by score instead of strength uses the other key
    b.scores = t(1.0, 2.0, 3.0, 5.0, 2.0, 2.0, 1.0, 1.0)
    by_score = PlackettLuceLoss(beta=beta, rank_by="score").batch_loss(b)
    g0_rev = -((-4 - lse(-1, -2, -4)) + (-2 - lse(-1, -2)))
    torch.testing.assert_close(by_score.losses, t(g0_rev, g1))


def test_plackett_luce_falls_back_to_pair_wins():
    b = group_batch([-1.0, -2.0, -4.0], [0.0] * 3, [float("nan")] * 3, [0, 0, 0], [(0, 1), (1, 2), (0, 2)])
    out = PlackettLuceLoss(beta=1.0).batch_loss(b)
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    assert float(out.loss) == pytest.approx(-((-1 - lse(-1, -2, -4)) + (-2 - lse(-2, -4))))


def test_lipo_lambda_by_hand():
    # one group of 3; labels psi = (2, 1, 0); scores s = beta * ratio = (0.5, 1.0, -1.0)
    b = group_batch([0.5, 1.0, -1.0], [0.0] * 3, [2.0, 1.0, 0.0], [0, 0, 0], [(0, 1), (1, 2), (0, 2)])
    out = LiPOLambdaLoss(beta=1.0).batch_loss(b)
    s = [0.5, 1.0, -1.0]
    rank = [2, 1, 3]  # by the current scores
    gain = [2**2 - 1, 2**1 - 1, 0]
    inv = [1 / math.log2(1 + r) for r in rank]
    total = 0.0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        delta = abs(gain[i] - gain[j]) * abs(inv[i] - inv[j])
        total += delta * math.log1p(math.exp(-(s[i] - s[j])))
    assert float(out.loss) == pytest.approx(total)
    # tied labels contribute nothing
    tied = group_batch([0.5, 1.0], [0.0, 0.0], [1.0, 1.0], [0, 0], [(0, 1)])
    assert float(LiPOLambdaLoss().batch_loss(tied).loss) == 0.0


def test_listwise_gradients_flow():
    b = group_batch([-1.0, -2.0, -4.0, -3.0], [0.0] * 4, [3.0, 2.0, 1.0, 0.0], [0, 0, 0, 0], [(0, 3)])
    b.policy_logps.requires_grad_(True)
    for cls in (PlackettLuceLoss, LiPOLambdaLoss):
        b.policy_logps.grad = None
        cls(beta=0.5).batch_loss(b).loss.backward()
        g = b.policy_logps.grad
        assert g is not None and float(g[0]) < 0 < float(g[3])  # the best goes up, the worst down


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: SimPOLoss(gamma=float("inf")), "gamma"),
        (lambda: EXOLoss(epsilon=0.0), "epsilon"),
        (lambda: ORPOLoss(average_logps=False), "ORPOLoss"),
        (lambda: KTOLoss(undesirable_weight=-1.0), "undesirable_weight"),
        (lambda: PlackettLuceLoss(rank_by="votes"), "rank_by"),
        (lambda: CombinedLoss([DPOLoss()], weights=[1.0, 2.0]), "weights"),
        (lambda: CombinedLoss([]), "losses"),
        (lambda: RPOLoss(nll_reduction="batch"), "nll_reduction"),
        (lambda: DPOLoss(beta_margin_scale=-1.0), "beta_margin_scale"),
    ],
)
def test_bad_arguments_name_the_option(make, name):
    with pytest.raises(ValueError, match=name):
        make()
