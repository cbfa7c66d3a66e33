"""benchmarks/gpu_check.sh --cpu: the GPU check's plumbing (steps, time limits, one JSON) runs end to end on CPU,
so the first GPU run is not the first run. The wheel install is skipped (no wheels dir); gpu_wheels.sh is checked
for syntax only (it downloads)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("kornia")

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path: Path, expect_status: int, timeout: float, **env: str) -> dict:
    """Run ``gpu_check.sh --cpu`` (no wheels to install) and return its JSON."""
    out = tmp_path / "check.json"
    env = {**os.environ, "VPA_WHEELS": str(tmp_path / "no-wheels"), **env}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_check_cpu_smoke(tmp_path):
    report = _check(tmp_path, 0, 1500, OMP_NUM_THREADS="1")
    assert report["mode"] == "cpu-smoke" and report["ok"] and report["environment"]["cuda"] is False
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["tests", "trainer_vs_trl", "trainer_qwen", "augment", "seva_generation", "video_dpo"]
    assert steps["tests"]["result"]["passed"] >= 2 and steps["tests"]["result"]["failed"] == 0
    trl = steps["trainer_vs_trl"]["result"]["results"]["cpu/pairwise"]
    assert trl["gradient_checkpointing"] and trl["vpa:packed"]["pairs_per_s"] > 0 and trl["trl"]["pairs_per_s"] > 0
    # tokens/s of the data is counted alike for both sides (its ratio is the pairs/s ratio); no MFU without a peak
    for side in ("vpa:packed", "trl"):
        assert trl[side]["tokens_per_s"] == pytest.approx(trl[side]["pairs_per_s"] * trl["trl"]["tokens_per_step"] / 2)
        assert trl[side]["tflops_per_s"] > 0 and trl[side]["mfu"] is None
        assert len(trl[side]["phases"]) == 2 and all(p["optimizer_s"] >= 0 for p in trl[side]["phases"])
        # --profile: one profiler cycle per step (the first with the set-up) and the teardown, each naming its top ops
        assert [p["step"] for p in trl[side]["profile"]] == [0, 1, "teardown"]
        assert any(op == "aten::mm" for op, _, _ in trl[side]["profile"][1]["self_cpu_ms"])
    qwen = steps["trainer_qwen"]["result"]["results"]["cpu/groups"]  # --skip-trl: vpa alone, no ratios
    assert "trl" not in qwen and qwen["vpa:packed"]["pairs_per_s"] > 0 and qwen["throughput_ratio_over_trl"] == {}
    assert steps["trainer_qwen"]["result"]["model"]["family"] == "qwen2_vl"
    assert steps["augment"]["result"] and steps["seva_generation"]["result"]
    video = steps["video_dpo"]["result"]["results"]["groups/4f"]
    assert video["packed"]["pairs_per_s"] > 0 and video["pairwise"]["pairs_per_s"] > 0 and "packed_vs_pairwise" in video
    log = (tmp_path / "check.log").read_text()
    assert all(f"== {name} (limit" in log for name in steps)  # every step's whole log comes back beside the JSON


def test_gpu_check_budget_skips_steps_and_still_reports(tmp_path):
    """With no budget left every step is recorded as skipped: the JSON is written and the exit code says so."""
    report = _check(tmp_path, 1, 300, VPA_CHECK_BUDGET="5")
    assert not report["ok"] and [s["step"] for s in report["steps"]] == ["tests", "trainer_vs_trl", "trainer_qwen", "augment",
                                                                         "seva_generation", "video_dpo"]
    assert all(s["skipped"] and s["timed_out"] for s in report["steps"])


def test_gpu_wheels_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_wheels.sh")], check=True)
