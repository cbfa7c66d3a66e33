"""Rule-based metrics of POPE, MME, MMBench (circular) and MVBench, on parsed answers, with torchmetrics.

All functions take the *parsed* predictions (``None`` = the parser could not read the answer)
and return flat ``{name: float}`` dicts. An unparseable answer is always wrong:

* POPE: it is counted as the class opposite to the label (a "yes" question answered with
  gibberish is a false negative, a "no" question a false positive), so it lowers accuracy and
  also precision or recall. The original POPE script instead maps every answer that does not
  contain "no"/"not" to yes, which rewards a model that babbles; ``unparsed`` reports how often
  it happened. ``yes_ratio`` is the fraction of answers *parsed* as yes.
* MME, MMBench and MVBench: it matches no label, like the official scripts' "other" answers.

POPE values are fractions in [0, 1]; MME scores follow the paper's scale (per category
(acc + acc+) * 100, i.e. 0..200; perception sums 10 categories, cognition 4).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "mmbench_metrics",
    "mme_metrics",
    "mvbench_metrics",
    "pope_metrics",
]

MME_PERCEPTION: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "ocr",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


def _mean(values: Sequence[float]) -> float:
    """Mean via ``torchmetrics.MeanMetric`` (0.0 for no values)."""
    if not values:
        return 0.0
    import torch
    from torchmetrics import MeanMetric

    metric = MeanMetric()
    metric.update(torch.tensor(list(values), dtype=torch.float64))
    return float(metric.compute())


def mme_category_key(category: str) -> str:
    """Canonical MME category name: lower case, spaces as underscores (``"OCR"`` -> ``"ocr"``)."""
    return category.strip().lower().replace(" ", "_")


def pope_metrics(
    preds: Sequence[str | None], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes"), yes_ratio, unparsed, n.

    ``preds``: ``"yes"`` / ``"no"`` / ``None`` per question; ``labels``: ``"yes"`` / ``"no"``.
    Precision is 0 when nothing is predicted yes (torchmetrics' zero-division rule).
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    n = len(labels)
    if n == 0:
        return {"n": 0.0}
    import torch
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        BinaryAccuracy,
        BinaryF1Score,
        BinaryPrecision,
        BinaryRecall,
    )

    target = torch.tensor([lab == "yes" for lab in labels], dtype=torch.long)
    # unparseable -> the wrong class, whatever the label
    pred = torch.tensor(
        [
            (p == "yes") if p is not None else (lab != "yes")
            for p, lab in zip(preds, labels)
        ],
        dtype=torch.long,
    )
    metrics = MetricCollection(
        {
            "accuracy": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "f1": BinaryF1Score(),
        }
    )
    out = {k: float(v) for k, v in metrics(pred, target).items()}
    out["yes_ratio"] = _mean([float(p == "yes") for p in preds])
    out["unparsed"] = _mean([float(p is None) for p in preds])
    out["n"] = float(n)
    return out


def mme_metrics(
    preds: Sequence[str | None],
    labels: Sequence[str],
    categories: Sequence[str],
    images: Sequence[str],
) -> dict[str, float]:
    """MME scores: ``<cat>/acc``, ``<cat>/acc_plus``, ``<cat>/score``, ``perception``, ``cognition``, ``total``.

    ``acc`` is per question; ``acc_plus`` per image: an image counts when all its questions (two in
    MME; those that were loaded, if one was rejected) are right. ``score`` = (acc + acc_plus) * 100.
    ``perception`` / ``cognition`` sum the scores of the standard categories present
    (:data:`MME_PERCEPTION`, :data:`MME_COGNITION`); other categories get their own scores only.
    """
    if not len(preds) == len(labels) == len(categories) == len(images):
        raise ValueError(
            "preds, labels, categories and images must have the same length"
        )
    if not preds:
        return {"n": 0.0}
    per_cat: dict[str, list[float]] = defaultdict(list)
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for pred, lab, cat, img in zip(preds, labels, categories, images):
        key = mme_category_key(cat)
        right = pred is not None and pred == lab.strip().lower()
        per_cat[key].append(float(right))
        per_image[(key, img)].append(right)
    out: dict[str, float] = {}
    for cat in sorted(per_cat):
        acc = _mean(per_cat[cat])
        acc_plus = _mean([float(all(v)) for (c, _), v in per_image.items() if c == cat])
        out[f"{cat}/acc"] = acc
        out[f"{cat}/acc_plus"] = acc_plus
        out[f"{cat}/score"] = (acc + acc_plus) * 100.0
    out["perception"] = sum(out[f"{c}/score"] for c in MME_PERCEPTION if c in per_cat)
    out["cognition"] = sum(out[f"{c}/score"] for c in MME_COGNITION if c in per_cat)
    out["total"] = out["perception"] + out["cognition"]
    out["unparsed"] = _mean([float(p is None) for p in preds])
    out["n"] = float(len(preds))
    return out


def mmbench_metrics(
    preds: Sequence[str | None],
    answers: Sequence[str],
    questions: Sequence[str],
    rotations: Sequence[int],
    categories: Sequence[str],
) -> dict[str, float]:
    """Circular and vanilla accuracy of MMBench, overall and per category.

    Row ``i`` is rotation ``rotations[i]`` of question ``questions[i]`` with correct letter
    ``answers[i]`` (in that rotation's lettering). A question is circular-correct only if every
    one of its rotations is answered right; vanilla accuracy looks at rotation 0 only.
    Keys: ``circular_acc``, ``vanilla_acc``, ``circular_acc/<cat>``, ``vanilla_acc/<cat>``,
    ``unparsed`` (fraction of rotations), ``n`` (questions).
    """
    if (
        not len(preds)
        == len(answers)
        == len(questions)
        == len(rotations)
        == len(categories)
    ):
        raise ValueError(
            "preds, answers, questions, rotations and categories must have the same length"
        )
    if not preds:
        return {"n": 0.0}
    all_right: dict[str, bool] = {}
    first_right: dict[str, bool] = {}
    category: dict[str, str] = {}
    for pred, ans, q, rot, cat in zip(preds, answers, questions, rotations, categories):
        right = pred is not None and pred.upper() == ans.upper()
        all_right[q] = all_right.get(q, True) and right
        if rot == 0:
            first_right[q] = right
        category[q] = cat
    # a question whose rotation 0 was dropped (rejected image) has no vanilla answer: wrong
    vanilla = {q: first_right.get(q, False) for q in all_right}
    out = {
        "circular_acc": _mean([float(v) for v in all_right.values()]),
        "vanilla_acc": _mean([float(v) for v in vanilla.values()]),
    }
    for cat in sorted(set(category.values())):
        qs = [q for q in all_right if category[q] == cat]
        out[f"circular_acc/{cat}"] = _mean([float(all_right[q]) for q in qs])
        out[f"vanilla_acc/{cat}"] = _mean([float(vanilla[q]) for q in qs])
    out["unparsed"] = _mean([float(p is None) for p in preds])
    out["n"] = float(len(all_right))
    return out


def mvbench_metrics(
    preds: Sequence[str | None], answers: Sequence[str], tasks: Sequence[str]
) -> dict[str, float]:
    """MVBench accuracy: ``accuracy`` over all questions (the official script's "avg"), ``task_mean`` (the
    mean of the per-task accuracies: the same number on the full set, 200 questions per task; not on a
    subset), ``accuracy/<task>``, ``unparsed``, ``n``.

    ``preds[i]``: the option letter parsed from the answer (``None``: unparsed, wrong); ``answers[i]``: the
    correct letter; ``tasks[i]``: the question's task.
    """
    if not len(preds) == len(answers) == len(tasks):
        raise ValueError("preds, answers and tasks must have the same length")
    if not preds:
        return {"n": 0.0}
    per_task: dict[str, list[float]] = defaultdict(list)
    right = []
    for pred, ans, task in zip(preds, answers, tasks):
        ok = float(pred is not None and pred.upper() == ans.upper())
        right.append(ok)
        per_task[task].append(ok)
    by_task = {t: _mean(per_task[t]) for t in sorted(per_task)}
    out = {"accuracy": _mean(right), "task_mean": _mean(list(by_task.values()))}
    out.update({f"accuracy/{t}": v for t, v in by_task.items()})
    out["unparsed"] = _mean([float(p is None) for p in preds])
    out["n"] = float(len(preds))
    return out
