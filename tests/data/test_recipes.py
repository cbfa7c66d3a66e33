"""Seed recipes by name (``--recipe``), each on a hand-worked example; ``--score``,
``--exclude-chosen-model``; contradictory pairwise annotations."""

from __future__ import annotations

import pytest

from vpa_lightning.data import build
from vpa_lightning.data.shards import ConfigError

from .conftest import make_image, read_samples, rejects, vlf_completion, vlf_row, write_jsonl


def pairs_by_text(js: dict) -> list[tuple[str, str]]:
    t = [r["text"] for r in js["responses"]]
    return sorted((t[p["chosen"]], t[p["rejected"]]) for p in js["pairs"])


def test_silkie_mean_all_pairs_ties_and_non_numeric_skipped(tmp_path):
    """Means: A (4,5,5)=4.667, B (2,3,5)=3.333, C (4,4,5)=4.333, D (2,3,5)=3.333 (ties with B),
    E has a non-numeric rating and is skipped. All pairs with a positive gap: A>B, A>C, A>D, C>B, C>D."""
    make_image(tmp_path / "a.png")
    write_jsonl(tmp_path / "vlf.jsonl", [vlf_row("a.png", "What is shown?", [
        vlf_completion("mA", "A", ("4", "5", "5")), vlf_completion("mB", "B", (2, 3, 5)),
        vlf_completion("mC", "C", ("4", 4, "5")), vlf_completion("mD", "D", ("2", "3", 5)),
        vlf_completion("mE", "E", ("N/A", "3", 5)),
    ])])
    m = build([tmp_path / "vlf.jsonl"], tmp_path / "out", recipe="silkie", val_fraction=0)
    assert m["config"]["strategy"] == "all-pairs" and m["config"]["score"] == "mean"
    (s,) = read_samples(tmp_path / "out").values()
    assert pairs_by_text(s["json"]) == [("A", "B"), ("A", "C"), ("A", "D"), ("C", "B"), ("C", "D")]
    margins = {(s["json"]["responses"][p["chosen"]]["text"], s["json"]["responses"][p["rejected"]]["text"]): p["margin"] for p in s["json"]["pairs"]}
    assert margins[("A", "B")] == pytest.approx(14 / 3 - 10 / 3)
    c = m["counts"]
    assert (c["pairs_dropped_ties"], c["responses_rejected"]) == (1, 1)


def rated(prompt: str, image: str, responses: list[tuple[str, str, tuple[int, int, int]]]) -> dict:
    """A HelpSteer-style rated row; complexity/verbosity are rated too but not in the MM-DPO sum."""
    return {"prompt": prompt, "image": image, "responses": [
        {"text": t, "model": m, "scores": {"helpfulness": h, "correctness": c, "coherence": co, "complexity": 4, "verbosity": 0}}
        for t, m, (h, c, co) in responses]}


# Sums of helpfulness + correctness + coherence: gold 12, a 10, c 9, b 7, d 3.
MMDPO_GROUP = [("gold", "gpt-4v", (4, 4, 4)), ("a", "llava", (3, 4, 3)), ("b", "llava", (2, 2, 3)),
               ("c", "llava", (3, 3, 3)), ("d", "llava", (1, 1, 1))]


def test_mmdpo_sum_top_against_one_random_at_least_two_lower(tmp_path):
    make_image(tmp_path / "a.png")
    rows = [rated(f"Question {i}?", "a.png", MMDPO_GROUP) for i in range(12)]
    write_jsonl(tmp_path / "rated.jsonl", rows)
    m = build([tmp_path / "rated.jsonl"], tmp_path / "out", recipe="mmdpo", val_fraction=0)
    assert m["config"]["aspects"] == [["helpfulness", 1.0], ["correctness", 1.0], ["coherence", 1.0]]
    samples = list(read_samples(tmp_path / "out").values())
    assert len(samples) == 12
    picks = [pairs_by_text(s["json"]) for s in samples]
    # One pair per group: gold (12) against one of a (10), c (9), b (7), d (3), all at least 2 lower;
    # the pick is seeded per group.
    assert all(len(p) == 1 and p[0][0] == "gold" for p in picks)
    assert {p[0][1] for p in picks} <= {"a", "b", "c", "d"} and len({p[0][1] for p in picks}) > 1
    margins = {p["margin"] for s in samples for p in s["json"]["pairs"]}
    assert margins <= {2.0, 3.0, 5.0, 9.0}


def test_mmdpo_excluding_the_gold_answer(tmp_path):
    """Gold excluded from being chosen: the top choosable is a (10); only b (7) and d (3) are >= 2 lower."""
    make_image(tmp_path / "a.png")
    write_jsonl(tmp_path / "rated.jsonl", [rated(f"Q{i}?", "a.png", MMDPO_GROUP) for i in range(12)])
    build([tmp_path / "rated.jsonl"], tmp_path / "out", recipe="mmdpo", exclude_chosen_models=["gpt-4v"], val_fraction=0)
    picks = [pairs_by_text(s["json"]) for s in read_samples(tmp_path / "out").values()]
    assert all(len(p) == 1 and p[0][0] == "a" and p[0][1] in {"b", "d"} for p in picks)
    assert {p[0][1] for p in picks} == {"b", "d"}
    # With the mean instead of the sum, b (7/3) is only 1 below a (10/3): only d (1.0) qualifies.
    build([tmp_path / "rated.jsonl"], tmp_path / "mean", recipe="mmdpo", score="mean", exclude_chosen_models=["gpt-4v"], val_fraction=0)
    picks = [pairs_by_text(s["json"]) for s in read_samples(tmp_path / "mean").values()]
    assert all(p == [("a", "d")] for p in picks)


def test_mmdpo_on_helpsteer_as_released(tmp_path):
    """nvidia/HelpSteer rows (one response per row, no image), grouped by prompt as the MM-DPO
    notebook's ``df.groupby(['prompt'])`` does. Sums: r1 12, r2 10, r3 9; r4 alone (no pair)."""
    row = lambda p, r, h, c, co: {"prompt": p, "response": r, "helpfulness": h, "correctness": c, "coherence": co,  # noqa: E731
                                  "complexity": 2, "verbosity": 2}
    rows = [row("Explain DNS.", "r1", 4, 4, 4), row("Explain DNS.", "r2", 3, 4, 3), row("Explain DNS.", "r3", 3, 3, 3),
            row("Say hi.", "r4", 4, 4, 4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    m = build([tmp_path / "train.jsonl"], tmp_path / "out", recipe="mmdpo", val_fraction=0)
    (s,) = read_samples(tmp_path / "out").values()
    assert s["images"] == [] and s["json"]["prompt"] == "Explain DNS."
    assert pairs_by_text(s["json"]) in ([("r1", "r2")], [("r1", "r3")])
    c = m["counts"]
    assert (c["records_in"], c["records_used"], c["records_deduplicated"], c["records_rejected"]) == (4, 1, 2, 1)
    assert "fewer than two" in rejects(tmp_path / "out")[0]["reason"]


def test_mmdpo_self_sampled_max_against_min(tmp_path):
    make_image(tmp_path / "a.png")
    rows = [rated("Spread?", "a.png", [("x", "s", (4, 3, 3)), ("y", "s", (3, 3, 3)), ("z", "s", (2, 2, 3))]),  # 10, 9, 7
            rated("Close?", "a.png", [("p", "s", (3, 3, 4)), ("q", "s", (3, 3, 3)), ("r", "s", (3, 3, 3))])]   # 10, 9, 9
    write_jsonl(tmp_path / "self.jsonl", rows)
    m = build([tmp_path / "self.jsonl"], tmp_path / "out", recipe="mmdpo-self", val_fraction=0)
    (s,) = read_samples(tmp_path / "out").values()
    assert pairs_by_text(s["json"]) == [("x", "z")] and s["json"]["pairs"][0]["margin"] == 3.0
    assert m["counts"]["records_rejected"] == 1
    (r,) = rejects(tmp_path / "out")
    assert "below margin 1" in r["reason"]


def test_seva_drops_only_pairs_identical_after_whitespace_and_eos(tmp_path):
    make_image(tmp_path / "1.jpg", fmt="JPEG")
    rows = [
        {"chosen": "STOP</s>", "reject": " STOP\n", "question": "What does the sign say?", "image_id": "1.jpg"},  # identical
        {"chosen": "STOP", "reject": "stop", "question": "And in lower case?", "image_id": "1.jpg"},  # case differs: kept
        {"chosen": "A red sign.", "reject": "A sign.", "question": "Describe it.", "image_id": "1.jpg"},
    ]
    write_jsonl(tmp_path / "seva.jsonl", rows)
    m = build([tmp_path / "seva.jsonl"], tmp_path / "out", recipe="seva", val_fraction=0)
    c = m["counts"]
    assert (c["groups"], c["pairs"], c["pairs_dropped_identical"], c["records_rejected"]) == (2, 2, 1, 1)
    got = sorted(pairs_by_text(s["json"])[0] for s in read_samples(tmp_path / "out").values())
    assert got == [("A red sign.", "A sign."), ("STOP", "stop")]
    # Without the recipe (exact dedup) "STOP</s>" and "STOP" are different answers: the pair is kept.
    assert build([tmp_path / "seva.jsonl"], tmp_path / "exact", val_fraction=0)["counts"]["pairs"] == 3


def test_recipe_conflicting_strategy_names_the_flags(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [])
    with pytest.raises(ConfigError, match="--recipe mmdpo .* --strategy best-vs-worst"):
        build([tmp_path / "x.jsonl"], tmp_path / "o", recipe="mmdpo", strategy="best-vs-worst")
    with pytest.raises(ConfigError, match="--recipe"):
        build([tmp_path / "x.jsonl"], tmp_path / "o", recipe="nope")


def test_contradictory_pairwise_annotations_are_reported(tmp_path):
    """A > B and B > A on the same image and prompt (two annotators), and a 3-cycle elsewhere."""
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", colour=(3, 3, 3))
    make_image(tmp_path / "c.png", colour=(9, 99, 9))
    rows = [
        {"image": "a.png", "question": "Q?", "chosen": "A", "rejected": "B"},
        {"image": "a.png", "question": "Q?", "chosen": "B", "rejected": "A"},
        {"image": "b.png", "question": "R?", "chosen": "x", "rejected": "y"},
        {"image": "b.png", "question": "R?", "chosen": "y", "rejected": "z"},
        {"image": "b.png", "question": "R?", "chosen": "z", "rejected": "x"},
        {"image": "c.png", "question": "S?", "chosen": "fine", "rejected": "worse"},
    ]
    write_jsonl(tmp_path / "pw.jsonl", rows)
    m = build([tmp_path / "pw.jsonl"], tmp_path / "out", val_fraction=0)
    c = m["counts"]
    assert (c["groups"], c["groups_contradictory"], c["records_rejected"]) == (1, 2, 5)
    rs = rejects(tmp_path / "out")
    assert sorted(r["line"] for r in rs) == [1, 2, 3, 4, 5]
    assert all("contradict each other" in r["reason"] for r in rs)
    assert any('"A" > "B" > "A"' in r["reason"] for r in rs)
