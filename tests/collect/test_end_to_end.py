"""Collection end to end on the demo world: a pool of two tiny local models (one trained a little on the demo, one
untrained) answers the demo's prompts (vpa sample), the rule judge checks each answer against the true answer
(vpa judge --judge rule), vpa-shard build makes the pairs (right over wrong), and a fresh model fitted on them
(vpa fit, the demo config) gets better on held-out prompts than the untrained model: preference accuracy and
greedy answers judged right."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path


from tests.collect.conftest import DEMO_CHOICES
from tests.conftest import console_script

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
UNTRAINED = "tiny:llava?image_size=56&vision_hidden=64&vision_init_factor=1"  # the demo config's model, as built


def _fit(shards: Path, root: Path, epochs: int):
    from vpa_lightning.cli import cli_main

    return cli_main(["fit", "--config", str(DEMO), "--seed_everything", "0", "--data.train_shards", str(shards),
                     "--model.reference_cache_dir", "null", "--trainer.default_root_dir", str(root),
                     "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                     "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
                     "--trainer.check_val_every_n_epoch", "1000", "--trainer.max_epochs", str(epochs)])


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sample_judge_build_fit_improves_on_the_untrained_model(tmp_path) -> None:
    from vpa_lightning.callbacks import PreferenceReport
    from vpa_lightning.data import build
    from vpa_lightning.data.demo import make_demo

    ann = make_demo(tmp_path / "world", num_images=240, seed=0, bad_records=False)
    build([str(ann)], tmp_path / "world-shards", val_fraction=0.2)
    pool_model = tmp_path / "trained"
    run = _fit(tmp_path / "world-shards", tmp_path / "pool-run", epochs=6)  # a weak member of the pool
    run.model.model.save_pretrained(pool_model)
    run.model.processor.save_pretrained(pool_model)

    sampled, judged, shards = tmp_path / "sampled.jsonl", tmp_path / "judged.jsonl", tmp_path / "shards"
    _run(console_script("vpa"), "sample", str(ann), "--model", f"trained={pool_model}", "--model", f"untrained={UNTRAINED}",
         "--k", "4", "--temperature", "0.7", "--max-new-tokens", "12", "--out", str(sampled))
    _run(console_script("vpa"), "judge", str(sampled), "--judge", "rule", "--reference", "truth.answer", "--choices",
         DEMO_CHOICES, "--out", str(judged))
    right = Counter(c["model"] for line in judged.read_text().splitlines() for c in json.loads(line)["completions"]
                    if c.get("annotations", {}).get("Verified", {}).get("Rating") == 1.0)
    assert right["trained"] > right["untrained"]  # the pool is uneven, as a real one is
    _run(console_script("vpa-shard"), "build", str(judged), "--out", str(shards), "--aspects", "Verified",
         "--val-fraction", "0.25")
    cli = _fit(shards, tmp_path / "fit", epochs=10)
    (report,) = [c for c in cli.trainer.callbacks if isinstance(c, PreferenceReport)]
    before, after = report.before, report.after
    print(f"held-out: rewards accuracy {before['val/rewards/accuracies']:.3f} -> {after['val/rewards/accuracies']:.3f}, "
          f"greedy correct {before['val/greedy/correct']:.3f} -> {after['val/greedy/correct']:.3f}")
    assert after["val/rewards/accuracies"] >= max(0.7, before["val/rewards/accuracies"] + 0.5)
    assert after["val/greedy/correct"] >= before["val/greedy/correct"] + 0.2


