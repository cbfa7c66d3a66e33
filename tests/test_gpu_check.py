"""benchmarks/gpu_check.sh --cpu: the GPU check's plumbing (steps, time limits, one JSON) runs end to end on CPU,
so the first GPU run is not the first run. The wheel install is skipped (no wheels dir); gpu_wheels.sh is checked
for syntax only (it downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("kornia")

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path: Path, expect_status: int, timeout: float, *args: str, **env: str) -> dict:
    """Run ``gpu_check.sh --cpu [args]`` (no wheels to install) and return its JSON."""
    out = tmp_path / "check.json"
    env = {**os.environ, "VPA_WHEELS": str(tmp_path / "no-wheels"), **env}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu", *args, str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)
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
    # --profile-last: the timed step ran without the profiler, one more step after it with it
    (profiled,) = qwen["vpa:packed"]["profile"]
    assert profiled["step"] == "after_timed" and profiled["wall_ms"] > 0 and profiled["self_cpu_ms"]
    assert len(qwen["vpa:packed"]["phases"]) == 3 and len(qwen["vpa:packed"]["step_seconds"]) == 1
    # MODE+compile (--model.compile_layers): the first step compiles, the later ones (new lengths) do not
    compiled = qwen["vpa:packed+compile"]
    assert compiled["phases"][0]["compiles"] > 0 and [p["compiles"] for p in compiled["phases"][1:]] == [0, 0]
    assert compiled["loss_step0"] == pytest.approx(qwen["vpa:packed"]["loss_step0"], abs=1e-5)
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


def test_gpu_check_parts(tmp_path):
    """--part N runs that part's steps only (the rest are not recorded); an unknown part is a usage error."""
    report = _check(tmp_path, 1, 300, "--part", "2", VPA_CHECK_BUDGET="5")
    assert [s["step"] for s in report["steps"]] == ["trainer_qwen", "video_dpo"]  # part 2's steps the CPU smoke has
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--part", "7"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--part must be 1, 2 or 3" in proc.stderr


def _benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_breakdown_on_the_h200s_kernel_names():
    """--profile-last's GPU split, on device rows named as GPU run 3's profiler named them on the H200."""
    rows = [
        ("nvjet_sm90_tst_256x152_64x4_1x2_h_bz_coopA_TNT", 30.0, 12),
        ("nvjet_sm90_tst_192x208_64x4_2x1_v_bz_coopB_NNT", 10.0, 4),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", 5.0, 1),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>, true>(Params)", 8.0, 64),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", 2.0, 2),
        ("Memcpy HtoD (Pageable -> Device)", 1.0, 3),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(...)", 4.0, 300),
        ("ProfilerStep*", 90.0, 1),  # spans the step's kernels: not one
        ("Optimizer.step#AdamW.step", 40.0, 1),  # a user annotation: spans kernels
        ("Lazy Function Loading", 3.0, 100),
    ]
    out = _benchmark("trainer_vs_trl").kernel_breakdown(rows, wall_ms=100.0)
    kinds = out["kinds"]
    assert set(kinds) == {"gemm", "attention", "memcpy_memset", "other"}
    assert kinds["gemm"]["ms"] == 45.0 and kinds["gemm"]["launches"] == 17
    assert kinds["attention"]["ms"] == 10.0 and kinds["memcpy_memset"]["ms"] == 1.0 and kinds["other"]["ms"] == 4.0
    assert out["kernel_ms"] == 60.0 and out["busy"] == 0.6
    assert kinds["gemm"]["share_of_kernel_time"] == 0.75
    assert _benchmark("trainer_vs_trl").kernel_breakdown([], wall_ms=0.0)["busy"] is None


def test_gpu_wheels_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_wheels.sh")], check=True)


def test_trainer_benchmark_reuses_its_model_folder_and_refuses_a_foreign_one(tmp_path):
    """--model-dir: built once (marked), reused by the next run of the same shape, kept; a folder it did not build
    is refused, its files untouched."""
    args = [str(ROOT / "benchmarks/trainer_vs_trl.py"), "--device", "cpu", "--settings", "pairwise", "--vpa-modes",
            "packed", "--steps", "1", "--warmup", "1", "--repeats", "1", "--pairs-per-step", "1", "--image-size", "28",
            "--max-length", "128", "--skip-trl", "--model-dir", str(tmp_path / "model"), "--json", str(tmp_path / "r.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reusing" not in first.stdout and (tmp_path / "model" / "vpa_benchmark_model.json").exists()
    second = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0 and f"model: reusing {tmp_path / 'model'}" in second.stdout
    assert (tmp_path / "model" / "config.json").exists()  # kept for the next run
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = subprocess.run([sys.executable, *args[:-4], "--model-dir", str(foreign), "--json", str(tmp_path / "r2.json")],
                             capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode == 2 and "not a folder this benchmark built" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
