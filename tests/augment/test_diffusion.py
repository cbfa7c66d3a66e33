"""DiffusionNoise: the SeVa beta schedule and the closed-form moments of q(x_t | x_0)."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from vpa_lightning.augment import DiffusionNoise, sigmoid_beta_schedule


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


@pytest.mark.parametrize("num_steps,beta_start,beta_end", [(1000, 1e-5, 5e-3), (50, 1e-4, 2e-2)])
def test_beta_schedule_matches_formula(num_steps, beta_start, beta_end):
    betas = sigmoid_beta_schedule(num_steps, beta_start, beta_end)
    assert betas.shape == (num_steps,) and betas.dtype == torch.float64
    span = beta_end - beta_start
    # Endpoints: linspace(-6, 6) starts at -6 and ends at +6 exactly.
    assert betas[0].item() == pytest.approx(_sigmoid(-6.0) * span + beta_start, rel=1e-12)
    assert betas[-1].item() == pytest.approx(_sigmoid(6.0) * span + beta_start, rel=1e-12)
    # Every step, from the formula evaluated independently in Python floats.
    for i in (1, num_steps // 2, num_steps - 2):
        grid = -6.0 + 12.0 * i / (num_steps - 1)
        assert betas[i].item() == pytest.approx(_sigmoid(grid) * span + beta_start, rel=1e-12)
    assert bool((betas[1:] > betas[:-1]).all())
    assert beta_start < betas.min().item() and betas.max().item() < beta_end


def test_schedule_matches_seva_reference_code():
    """SeVa/VCD build the schedule in float32 and index alphas_cumprod with the 0-based step."""
    betas32 = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    alphas_prod = torch.cumprod(1 - betas32, dim=0)
    for step in (0, 500, 800, 999):
        noise = DiffusionNoise(step=step)
        assert noise.signal_scale == pytest.approx(math.sqrt(alphas_prod[step].item()), rel=1e-5)
        # float32 1 - abar loses digits near step 0, hence an absolute tolerance here.
        assert noise.noise_scale == pytest.approx(math.sqrt(1 - alphas_prod[step].item()), abs=1e-5)


def test_alpha_bar_is_cumulative_product():
    noise = DiffusionNoise(step=500)
    betas = noise.betas.tolist()
    expected = math.prod(1.0 - b for b in betas[: 500 + 1])
    assert noise.alphas_cumprod[500].item() == pytest.approx(expected, rel=1e-12)
    assert noise.signal_scale**2 == pytest.approx(expected, rel=1e-12)
    assert noise.noise_scale**2 == pytest.approx(1 - expected, rel=1e-12)


@pytest.mark.parametrize("step", [500, 800])
def test_closed_form_mean_and_variance(step):
    """x_t has per-element mean sqrt(abar_t) x0 and variance 1 - abar_t.

    n samples per pixel; the sample mean's standard error is sqrt(var / n), the sample variance's
    is var * sqrt(2 / (n - 1)) (Gaussian). Tolerances are Bonferroni-corrected z-bounds for a
    family-wise false-alarm rate of 1e-6 over all pixel tests (the test is seeded, so it is also
    deterministic).
    """
    n, channels, size = 4096, 3, 8
    x0 = torch.linspace(-2.0, 2.0, channels * size * size, dtype=torch.float64).view(1, channels, size, size)
    noise = DiffusionNoise(step=step)
    abar = noise.alphas_cumprod[step].item()
    xt = noise(x0.expand(n, -1, -1, -1).contiguous(), seed=1234)

    pixels = channels * size * size
    z_bound = NormalDist().inv_cdf(1 - 1e-6 / (2 * 2 * pixels))
    mean = xt.mean(0)
    var = xt.var(0, unbiased=True)
    mean_z = (mean - math.sqrt(abar) * x0[0]) / math.sqrt((1 - abar) / n)
    var_z = (var - (1 - abar)) / ((1 - abar) * math.sqrt(2 / (n - 1)))
    assert mean_z.abs().max().item() < z_bound
    assert var_z.abs().max().item() < z_bound

    # Pooled over all n * pixels elements: much tighter bounds on the standardised residual.
    total = n * pixels
    resid = (xt - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
    z_pooled = NormalDist().inv_cdf(1 - 1e-6 / 2)
    assert abs(resid.mean().item()) < z_pooled / math.sqrt(total)
    assert abs(resid.var().item() - 1.0) < z_pooled * math.sqrt(2 / (total - 1))


def test_noise_keeps_dtype_and_does_not_modify_input():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float16)
    before = x.clone()
    y = DiffusionNoise(step=800)(x, seed=0)
    assert y.dtype == torch.float16 and y.shape == x.shape
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"step": 1000}, "step"),
        ({"step": -1}, "step"),
        ({"step": 10, "num_steps": 10}, "step"),
        ({"step": 1.5}, "step"),
        ({"num_steps": 0, "step": 0}, "num_steps"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_start": 1e-2, "beta_end": 1e-3}, "beta_end"),
        ({"beta_end": 1.0}, "beta_end"),
    ],
)
def test_bad_arguments_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        DiffusionNoise(**kwargs)
