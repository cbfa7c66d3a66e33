"""Distributed strategies through `vpa fit`: DDP on CPU (gloo, 2 processes) runs here; FSDP, DeepSpeed
ZeRO-2/3 and bf16 need CUDA and are skipped without it (they run as-is on a GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()


def _fit(demo_shards: Path, tmp_path: Path, *extra: str, timeout: int = 600) -> list[dict]:
    probe = tmp_path / "probe"
    cmd = [
        sys.executable, "-m", "vpa_lightning.cli", "fit",
        "--model.model_name_or_path=tiny:llava",
        "--model.lora_r=4",
        f"--data.train_shards={demo_shards}",
        "--data.batch_size=2",
        "--data.groups_per_epoch=8",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=tests.trainer.probe.RankProbe",
        f"--trainer.callbacks.out_dir={probe}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))]


def test_ddp_two_cpu_processes(demo_shards, tmp_path):
    ranks = _fit(
        demo_shards, tmp_path,
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
    )
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["strategy"] == "DDPStrategy" and r["global_step"] == 2 for r in ranks)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    # every rank trained on its own batches (2 steps x batch 2 each)
    assert all(len(r["keys"]) == 4 for r in ranks)
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_mixed_on_gpu(demo_shards, tmp_path):
    (rank,) = _fit(demo_shards, tmp_path, "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed")
    assert rank["precision"] == "bf16-mixed" and rank["global_step"] == 2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fsdp_on_gpu(demo_shards, tmp_path):
    (rank,) = _fit(
        demo_shards, tmp_path, "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.strategy=fsdp",
        "--trainer.precision=bf16-mixed",
    )
    assert rank["strategy"] == "FSDPStrategy" and rank["global_step"] == 2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_gpu(stage, demo_shards, tmp_path):
    pytest.importorskip("deepspeed")
    (rank,) = _fit(
        demo_shards, tmp_path, "--trainer.accelerator=gpu", "--trainer.devices=1",
        "--trainer.strategy=lightning.pytorch.strategies.DeepSpeedStrategy",
        f"--trainer.strategy.config={ROOT / 'configs' / 'deepspeed' / f'{stage}.json'}",
        "--trainer.precision=bf16-mixed",
    )
    assert rank["strategy"] == "DeepSpeedStrategy" and rank["global_step"] == 2
