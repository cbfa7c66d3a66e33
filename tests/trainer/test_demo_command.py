"""``vpa demo``: the README's first set-up command builds the demo shards, trains and prints the
before/after table, through the installed console script (reduced size here)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.conftest import console_script

ROOT = Path(__file__).resolve().parents[2]


def test_vpa_demo_builds_trains_and_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [console_script("vpa"), "demo", "--out", str(out), "--num-images", "16", "--seed", "1", "--max-steps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["groups_val"] > 0 and manifest["config"]["seed"] == 1
    assert "vpa-shard summary" in proc.stdout
    table = proc.stdout[proc.stdout.index("Preference report"):]
    assert re.search(r"metric +\| +before +\| +after", table)
    accuracy = next(line for line in table.splitlines() if line.startswith("val/rewards/accuracies"))
    before, after = (float(x) for x in accuracy.split("|")[1:])
    assert before == 0.0 and after > 0.0  # the policy moved away from its reference
    assert list((out / "runs").glob("**/checkpoints/*.ckpt")) and list((out / "reference-cache").iterdir())


def test_packaged_demo_config_is_configs_demo_yaml():
    from vpa_lightning.demo import CONFIG

    assert CONFIG.read_bytes() == (ROOT / "configs" / "demo.yaml").read_bytes()
