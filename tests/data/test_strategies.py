"""Each pair strategy on a hand-worked VLFeedback record (see the ``hand_worked`` fixture)."""

import math

import pytest

from vpa_lightning.data import bradley_terry, build, strategies

from .conftest import read_samples

MEANS = {"A": 14 / 3, "B": 10 / 3, "C": 13 / 3, "D": 10 / 3}
TEXT = {"A": "A red square on white.", "B": "A blue circle.", "C": "A red square.", "D": "A green cat."}


def pairs_of(out):
    (sample,) = read_samples(out).values()
    js = sample["json"]
    name = {i: next(k for k, t in TEXT.items() if t == r["text"]) for i, r in enumerate(js["responses"])}
    return {(name[p["chosen"]], name[p["rejected"]]): p for p in js["pairs"]}, js


def run(tmp_path, hand_worked, **kw):
    out = tmp_path / "out"
    m = build([hand_worked], out, val_fraction=0.0, allow_empty=True, **kw)
    return m, out


def test_all_pairs_is_silkie(tmp_path, hand_worked):
    m, out = run(tmp_path, hand_worked, strategy="all-pairs")
    pairs, js = pairs_of(out)
    assert set(pairs) == {("A", "B"), ("A", "C"), ("A", "D"), ("C", "B"), ("C", "D")}
    assert m["counts"]["pairs"] == 5
    assert m["counts"]["pairs_dropped_ties"] == 1  # B and D tie at 10/3
    for (c, r), p in pairs.items():
        assert p["margin"] == pytest.approx(MEANS[c] - MEANS[r])
    # Responses are ranked by strength: A first; per-aspect scores are numbers.
    assert js["responses"][0]["text"] == TEXT["A"]
    assert js["responses"][0]["scores"] == {"Ethical Considerations": 5.0, "Helpfulness": 4.0, "Visual Faithfulness": 5.0}
    assert js["responses"][0]["model"] == "mA"


def test_best_vs_rest_is_mm_dpo(tmp_path, hand_worked):
    # Default margin 2: nothing is 2 points below A, so the record yields no pair and is rejected.
    m, _ = run(tmp_path, hand_worked, strategy="best-vs-rest")
    assert m["counts"]["pairs"] == 0 and m["counts"]["records_rejected"] == 1
    assert m["counts"]["pairs_dropped_margin"] == 3
    m, out = run(tmp_path, hand_worked, strategy="best-vs-rest", min_margin=1.0)
    pairs, _ = pairs_of(out)
    assert set(pairs) == {("A", "B"), ("A", "D")}
    assert m["counts"]["pairs_dropped_margin"] == 1  # A vs C: 1/3 < 1


def test_best_vs_worst(tmp_path, hand_worked):
    _, out = run(tmp_path, hand_worked, strategy="best-vs-worst")
    pairs, _ = pairs_of(out)
    # B and D tie on every aspect; the later one (D) is taken as the worst.
    assert set(pairs) == {("A", "D")}


def test_best_vs_random_is_seeded(tmp_path, hand_worked):
    seen = set()
    for seed in range(12):
        _, out = run(tmp_path / str(seed), hand_worked, strategy="best-vs-random", seed=seed)
        pairs, _ = pairs_of(out)
        assert len(pairs) == 1
        (pair,) = pairs
        assert pair[0] == "A" and pair[1] in {"B", "C", "D"}
        seen.add(pair)
        _, again = run(tmp_path / f"{seed}b", hand_worked, strategy="best-vs-random", seed=seed)
        assert pairs_of(again)[0].keys() == pairs.keys()
    assert len(seen) > 1  # different seeds pick different rejected answers


def test_min_probability_uses_bradley_terry(tmp_path, hand_worked):
    # Rebuild the comparisons by hand: per aspect, higher rating wins (weight 1), ties give half.
    ratings = {"A": (4, 5, 5), "B": (2, 3, 5), "C": (4, 4, 5), "D": (2, 3, 5)}
    names = list("ABCD")
    comps = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for x, y in zip(ratings[a], ratings[b]):
                if x > y:
                    comps.append((names.index(a), names.index(b), 1.0))
                elif y > x:
                    comps.append((names.index(b), names.index(a), 1.0))
                else:
                    comps += [(names.index(a), names.index(b), 0.5), (names.index(b), names.index(a), 0.5)]
    theta = dict(zip(names, bradley_terry(4, comps, alpha=0.1)))
    expected = set()
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            hi, lo = (a, b) if theta[a] >= theta[b] else (b, a)
            if 1 / (1 + math.exp(-(theta[hi] - theta[lo]))) >= 0.75:
                expected.add((hi, lo))
    _, out = run(tmp_path, hand_worked, strategy="min-probability", min_probability=0.75)
    pairs, js = pairs_of(out)
    assert set(pairs) == expected and expected
    for (c, r), p in pairs.items():
        assert p["probability"] == pytest.approx(1 / (1 + math.exp(-(theta[c] - theta[r]))), abs=1e-9)
    strengths = {next(k for k, t in TEXT.items() if t == r["text"]): r["strength"] for r in js["responses"]}
    assert strengths == pytest.approx(theta, abs=1e-9)


def test_strategy_table_lists_all():
    assert [s[0] for s in strategies()] == ["all-pairs", "best-vs-rest", "best-vs-worst", "best-vs-random", "min-probability"]
