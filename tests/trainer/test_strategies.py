"""Distributed strategies through `vpa fit`: DDP on CPU (gloo, 2 processes) runs here, and Lightning's
FSDPStrategy on 2 CPU processes through a test subclass (tests/trainer/cpu_fsdp.py); FSDP on a GPU,
DeepSpeed ZeRO-2/3 and bf16 need CUDA and are skipped without it (they run as-is on a GPU machine)."""

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
    # keep the caller's PYTHONPATH behind the checkout (the GPU check's carried wheels live there)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
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


def test_ddp_full_finetuning_with_reference_trains_and_resumes(demo_shards, tmp_path):
    """Full fine-tuning: the frozen reference is created in configure_model on every rank, kept out of
    DDP's broadcasts and out of the checkpoint; a resumed run continues from it."""
    ddp = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--model.lora=false")
    ranks = _fit(demo_shards, tmp_path, *ddp)
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert all(r["ddp_ignored"] and all(n.startswith("reference_model.") for n in r["ddp_ignored"]) for r in ranks)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(k.startswith("model.") for k in state) and not any("reference" in k for k in state)
    resumed = _fit(demo_shards, tmp_path / "resumed", *ddp, "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    assert [r["global_step"] for r in resumed] == [3, 3]
    assert all(len(r["keys"]) == 2 for r in resumed)  # one more step of batch 2 on each rank


def test_lightning_fsdp_on_two_cpu_processes_loads_on_rank0_only(demo_shards, tmp_path):
    """Lightning's own FSDPStrategy through `vpa fit` (a subclass that runs on CPU over gloo, see
    tests/trainer/cpu_fsdp.py), full fine-tuning: no FSDP flag given, yet rank 1 reaches the wrap with
    every tensor on the meta device (rank 0 with none), both ranks end with the same full parameters,
    the reference is still the source, and the checkpoint holds the trained policy only."""
    from vpa_lightning.models import build_tiny_vlm

    probe = tmp_path / "fsdp"
    ranks = _fit(
        demo_shards, tmp_path, "--trainer.accelerator=cpu", "--trainer.devices=2", "--model.lora=false",
        "--trainer.strategy=tests.trainer.cpu_fsdp.CPUFSDPStrategy", f"--trainer.strategy.out_dir={probe}",
        "--trainer.callbacks+=tests.trainer.cpu_fsdp.FullParamsProbe", f"--trainer.callbacks.out_dir={probe}",
    )
    assert [(r["strategy"], r["global_step"]) for r in ranks] == [("CPUFSDPStrategy", 2)] * 2
    loaded = [json.loads((probe / f"loaded{r}.json").read_text()) for r in (0, 1)]
    assert all(r["kwargs"] == ["param_init_fn", "sync_module_states"] for r in loaded)  # set by the module
    assert loaded[0]["on_meta"] == 0 and loaded[1]["on_meta"] == loaded[1]["tensors"] > 0
    trained = [json.loads((probe / f"trained{r}.json").read_text()) for r in (0, 1)]
    assert trained[0] == trained[1]
    source = {n: t.double().sum().item() for n, t in (*build_tiny_vlm("llava", seed=0)[0].named_parameters(),)}
    assert {n: trained[0][f"reference_model.{n}"] for n in source} == source
    assert any(trained[0][f"model.{n}"] != v for n, v in source.items())
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and not any("reference" in k for k in state)
    assert all(state[k].double().sum().item() == pytest.approx(trained[0][k], abs=1e-9) for k in state)


def test_lightning_fsdp_sharded_checkpoint_with_a_reference_resumes(demo_shards, tmp_path):
    """Full fine-tuning under FSDP with sharded checkpoints (torch's distributed checkpoint, a folder of shards):
    the run resumes from it (it failed with "Missing key in checkpoint state_dict: model.reference_model...")
    and, one step later, the reference is still the source."""
    from vpa_lightning.models import build_tiny_vlm

    probe = tmp_path / "fsdp"
    fsdp = ("--trainer.accelerator=cpu", "--trainer.devices=2", "--model.lora=false",
            "--trainer.strategy=tests.trainer.cpu_fsdp.CPUFSDPStrategy", f"--trainer.strategy.out_dir={probe}",
            "--trainer.strategy.state_dict_type=sharded")
    assert [r["global_step"] for r in _fit(demo_shards, tmp_path, *fsdp)] == [2, 2]
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert ckpt.is_dir() and list(ckpt.glob("*.distcp"))
    resumed = _fit(demo_shards, tmp_path / "resumed", *fsdp, "--trainer.max_steps=3", f"--ckpt_path={ckpt}",
                   "--trainer.callbacks+=tests.trainer.cpu_fsdp.FullParamsProbe", f"--trainer.callbacks.out_dir={probe}")
    assert [r["global_step"] for r in resumed] == [3, 3]
    trained = json.loads((probe / "trained0.json").read_text())
    source = {n: t.double().sum().item() for n, t in build_tiny_vlm("llava", seed=0)[0].named_parameters()}
    assert {n: trained[f"reference_model.{n}"] for n in source} == source


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_mixed_on_gpu(demo_shards, tmp_path):
    (rank,) = _fit(demo_shards, tmp_path, "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed")
    assert rank["precision"] == "bf16-mixed" and rank["global_step"] == 2


#: LoRA (the reference is the base with adapters off) and full fine-tuning (a frozen reference created in
#: configure_model, sharded by the strategy like the policy, kept out of the optimizer and the checkpoint).
TUNING = {"lora": (), "full": ("--model.lora=false",)}


def _no_reference_in_checkpoints(tmp_path: Path) -> None:
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        if ckpt.is_file():  # DeepSpeed writes a folder of partitions (its module file has no reference either)
            assert not any("reference" in k for k in torch.load(ckpt, weights_only=False)["state_dict"])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tuning", list(TUNING))
def test_fsdp_on_gpu(tuning, demo_shards, tmp_path):
    (rank,) = _fit(
        demo_shards, tmp_path, "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.strategy=fsdp",
        "--trainer.precision=bf16-mixed", *TUNING[tuning],
    )
    assert rank["strategy"] == "FSDPStrategy" and rank["global_step"] == 2
    _no_reference_in_checkpoints(tmp_path)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tuning", list(TUNING))
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_on_gpu(stage, tuning, demo_shards, tmp_path):
    pytest.importorskip("deepspeed")
    (rank,) = _fit(
        demo_shards, tmp_path, "--trainer.accelerator=gpu", "--trainer.devices=1",
        "--trainer.strategy=lightning.pytorch.strategies.DeepSpeedStrategy",
        f"--trainer.strategy.config={ROOT / 'configs' / 'deepspeed' / f'{stage}.json'}",
        "--trainer.precision=bf16-mixed", *TUNING[tuning],
    )
    assert rank["strategy"] == "DeepSpeedStrategy" and rank["global_step"] == 2
