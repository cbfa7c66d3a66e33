"""POPE / MME / MMBench metrics against hand-computed values."""

from __future__ import annotations

import pytest

from vpa_lightning.eval.metrics import mmbench_metrics, mme_metrics, pope_metrics


def test_pope_counts_unparsed_as_wrong() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    preds = ["yes", "yes", "no", "no", "yes", "no", None, None]
    # effective predictions: the two None become the wrong class -> "no" (label yes), "yes" (label no)
    # TP = rows 0,1 = 2; FN = rows 2,6 = 2; FP = rows 4,7 = 2; TN = rows 3,5 = 2
    # accuracy = (2 + 2) / 8 = 0.5; precision = 2 / (2 + 2) = 0.5; recall = 2 / (2 + 2) = 0.5; F1 = 0.5
    # yes_ratio counts answers parsed as yes: rows 0,1,4 = 3/8; unparsed = 2/8
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    assert m["unparsed"] == pytest.approx(2 / 8)
    assert m["n"] == 8


def test_pope_asymmetric() -> None:
    labels = ["yes", "yes", "yes", "no", "no"]
    preds = ["yes", "yes", "no", "yes", "no"]
    # TP 2, FN 1, FP 1, TN 1: acc 3/5, precision 2/3, recall 2/3, F1 = 2PR/(P+R) = 2/3, yes_ratio 3/5
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.6)
    # all "no": no positive prediction -> precision 0 (zero division), recall 0, accuracy 2/5
    m = pope_metrics(["no"] * 5, labels)
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == pytest.approx(
        (0.0, 0.0, 0.0, 0.4)
    )


def test_pope_empty_and_mismatch() -> None:
    assert pope_metrics([], []) == {"n": 0.0}
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


def test_mme_scores() -> None:
    rows = [
        # (pred, label, category, image)
        ("yes", "Yes", "existence", "e1"),
        ("no", "No", "existence", "e1"),  # e1 both right
        ("yes", "Yes", "existence", "e2"),
        ("yes", "No", "existence", "e2"),  # e2 one wrong
        ("no", "Yes", "OCR", "o1"),
        (None, "No", "OCR", "o1"),  # o1 both wrong (unparsed is wrong)
        ("yes", "Yes", "code_reasoning", "c1"),
        ("no", "No", "code_reasoning", "c1"),  # c1 both right
        ("yes", "Yes", "my_extra", "x1"),
        ("no", "No", "my_extra", "x1"),
    ]
    m = mme_metrics(*map(list, zip(*rows)))
    # existence: acc = 3/4 = 0.75, acc+ = 1/2 = 0.5 -> score (0.75 + 0.5) * 100 = 125
    assert m["existence/acc"] == pytest.approx(0.75)
    assert m["existence/acc_plus"] == pytest.approx(0.5)
    assert m["existence/score"] == pytest.approx(125.0)
    # ocr (category name lower-cased): acc 0, acc+ 0 -> 0
    assert m["ocr/score"] == pytest.approx(0.0)
    # code_reasoning: acc 1, acc+ 1 -> 200
    assert m["code_reasoning/score"] == pytest.approx(200.0)
    # perception = existence + ocr = 125 + 0; cognition = code_reasoning = 200; my_extra in neither total
    assert m["perception"] == pytest.approx(125.0)
    assert m["cognition"] == pytest.approx(200.0)
    assert m["total"] == pytest.approx(325.0)
    assert m["my_extra/score"] == pytest.approx(200.0)
    assert m["unparsed"] == pytest.approx(1 / 10)
    assert m["n"] == 10


def test_mmbench_circular() -> None:
    # q1: 3 options, all 3 rotations right -> circular right; q2: 4 options, rot0 right, rot2 wrong
    # q3 (category b): rot0 unparsed (wrong), rot1 right
    rows = [
        ("A", "A", "q1", 0, "a"),
        ("C", "C", "q1", 1, "a"),
        ("B", "B", "q1", 2, "a"),
        ("D", "D", "q2", 0, "a"),
        ("C", "C", "q2", 1, "a"),
        ("A", "B", "q2", 2, "a"),
        ("A", "A", "q2", 3, "a"),
        (None, "A", "q3", 0, "b"),
        ("B", "B", "q3", 1, "b"),
    ]
    m = mmbench_metrics(*map(list, zip(*rows)))
    # circular: q1 only -> 1/3; vanilla (rotation 0): q1, q2 right -> 2/3
    assert m["circular_acc"] == pytest.approx(1 / 3)
    assert m["vanilla_acc"] == pytest.approx(2 / 3)
    # category a: circular 1/2 (q1 of q1,q2), vanilla 2/2; category b: 0 and 0
    assert m["circular_acc/a"] == pytest.approx(0.5)
    assert m["vanilla_acc/a"] == pytest.approx(1.0)
    assert m["circular_acc/b"] == pytest.approx(0.0)
    assert m["vanilla_acc/b"] == pytest.approx(0.0)
    assert m["unparsed"] == pytest.approx(1 / 9)
    assert m["n"] == 3
