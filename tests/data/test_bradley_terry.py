"""Bradley-Terry strengths against choix (reference implementation) and hand-worked fits."""

import math
import random

import numpy as np
import pytest

from vpa_lightning.data import ConfigError, bradley_terry

choix = pytest.importorskip("choix")


@pytest.mark.parametrize("seed", range(5))
def test_matches_choix_map_estimate(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 8)
    data = [tuple(rng.sample(range(n), 2)) for _ in range(rng.randint(n, 6 * n))]
    alpha = rng.choice([0.05, 0.1, 1.0])
    ours = np.array(bradley_terry(n, [(w, l, 1.0) for w, l in data], alpha=alpha))
    # choix penalises alpha * sum(theta^2); ours (alpha / 2) * sum(theta^2).
    ref = choix.opt_pairwise(n, data, alpha=alpha / 2, method="Newton-CG", tol=1e-12)
    np.testing.assert_allclose(ours, ref - ref.mean(), atol=1e-6)
    assert abs(ours.mean()) < 1e-9


def test_ties_and_weights_match_duplicated_data():
    # A tie is half a win each way; doubling every count and the penalty gives integer data for choix.
    comps = [(0, 1, 1.0), (1, 2, 2.0), (0, 2, 0.5), (2, 0, 0.5)]
    doubled = [(0, 1)] * 2 + [(1, 2)] * 4 + [(0, 2), (2, 0)]
    ours = np.array(bradley_terry(3, comps, alpha=0.2))
    ref = choix.opt_pairwise(3, doubled, alpha=0.2, method="Newton-CG", tol=1e-12)
    np.testing.assert_allclose(ours, ref - ref.mean(), atol=1e-6)


def test_two_items_hand_worked():
    # One win, alpha=1: theta = (t, -t) with 1 - sigmoid(2t) = t.
    t, u = bradley_terry(2, [(0, 1, 1.0)], alpha=1.0)
    assert u == pytest.approx(-t)
    assert 1 - 1 / (1 + math.exp(-2 * t)) == pytest.approx(t, abs=1e-8)  # strengths are quantised to 1e-9


def test_strict_ranking_is_finite():
    th = bradley_terry(4, [(i, j, 3.0) for i in range(4) for j in range(i + 1, 4)], alpha=1e-3)
    assert all(math.isfinite(x) for x in th)
    assert th == sorted(th, reverse=True)


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(ConfigError, match="alpha"):
        bradley_terry(2, [(0, 1, 1.0)], alpha=0.0)
    with pytest.raises(ConfigError, match="outside"):
        bradley_terry(2, [(0, 5, 1.0)])
