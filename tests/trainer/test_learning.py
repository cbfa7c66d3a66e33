"""The demo learns: DPO of the tiny LLaVA on a freshly built demo set, through the CLI and configs/demo.yaml.

``PreferenceReport`` (enabled in the demo config) measures the validation preference metrics
before the first step and after the last one. Under LoRA the policy starts equal to the
reference, so every implicit reward is 0 before training: rewards accuracy 0 (strict
``chosen > rejected``), margin 0, DPO loss ``log 2``.

What the tiny random model can learn on CPU in seconds: the pairs whose order shows in the text
(anything versus the answer with the invented cat, right full sentence versus terse answer),
four of the six pairs of a group, on held-out images too. The other two need the image: right
versus wrong full sentence, and terse answer versus wrong full sentence (the format alone
favours the sentence). There the model fits the training images but generalises only a little
to held-out ones (measured per pair type: about 0.6-0.75 and 0.2-0.7, also with 56 px images,
a wider vision tower with a smaller initialisation, RPO, or 20 epochs), which is why held-out
accuracy ends around 0.83 = 4/6 + 2/6 * 0.5, not 0.9 (see ``test_demo_reaches_090``, an
expected failure that records the gap).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vpa_lightning.cli import cli_main

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
NUM_IMAGES = 240
VAL_FRACTION = 0.2
SEED = 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run ``vpa fit --config configs/demo.yaml`` on a demo set built here; the PreferenceReport callback."""
    import lightning.pytorch as pl

    from vpa_lightning.callbacks import PreferenceReport
    from vpa_lightning.data import build
    from vpa_lightning.data.demo import make_demo

    root = tmp_path_factory.mktemp("learning")
    ann = make_demo(root / "data", num_images=NUM_IMAGES, seed=SEED)
    build([str(ann)], root / "shards", val_fraction=VAL_FRACTION, seed=SEED)
    pl.seed_everything(SEED)
    cli = cli_main(
        [
            "fit",
            "--config", str(DEMO),
            "--seed_everything", str(SEED),
            "--data.train_shards", str(root / "shards"),
            "--model.reference_cache_dir", str(root / "cache"),
            "--trainer.default_root_dir", str(root / "runs"),
            "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.check_val_every_n_epoch", "1000",  # the report does its own passes
        ]
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, PreferenceReport)]
    assert len(callbacks) == 1, "configs/demo.yaml should enable PreferenceReport"
    return callbacks[0]


def test_report_has_every_metric(report):
    names = {"val/rewards/accuracies", "val/rewards/margins", "val/loss", "val/logps/chosen", "val/logps/rejected"}
    assert names <= set(report.before) and names <= set(report.after)
    assert all(math.isfinite(v) for v in (*report.before.values(), *report.after.values()))


def test_before_is_untrained(report):
    before = report.before
    assert before["val/rewards/accuracies"] <= 0.7
    assert before["val/rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # LoRA starts at the reference
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_demo_learns(report):
    before, after = report.before, report.after
    assert after["val/rewards/accuracies"] >= 0.75
    assert after["val/rewards/accuracies"] >= before["val/rewards/accuracies"] + 0.5
    assert after["val/rewards/margins"] > 1.0
    assert after["val/loss"] < before["val/loss"] - 0.2
    # DPO pushes the rejected answers down more than the chosen ones
    assert after["val/logps/rejected"] - before["val/logps/rejected"] < after["val/logps/chosen"] - before["val/logps/chosen"]
    # the policy's own log-probs rank the pairs at least as well as before
    assert after["val/logps/accuracies"] >= before["val/logps/accuracies"]


@pytest.mark.xfail(reason="held-out rewards accuracy of the tiny model ends ~0.8: image-dependent pairs barely generalise", strict=False)
def test_demo_reaches_090(report):
    assert report.after["val/rewards/accuracies"] >= 0.9


def test_format_report():
    from vpa_lightning.callbacks import format_report

    text = format_report({"val/loss": 0.6931, "val/rewards/accuracies": 0.0}, {"val/loss": 0.3, "x": 1.0})
    lines = text.splitlines()
    assert lines[1].split("|")[0].strip() == "metric" and "before" in lines[1] and "after" in lines[1]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in lines[3:]}
    assert rows["val/loss"] == ["0.6931", "0.3000"]
    assert rows["val/rewards/accuracies"] == ["0.0000", "-"] and rows["x"] == ["-", "1.0000"]
