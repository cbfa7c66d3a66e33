"""Several devices through `vpa fit`, on CPU processes over gloo (the same Lightning and DDP code paths as NCCL):
shards that split unevenly never leave a rank waiting (every rank runs the same steps, epoch ends and validation
included), each epoch gives every training sample to exactly one rank (bar the documented remainder), validation
reads every sample exactly once, a trainable vision tower trains under plain DDP, a resume mid-epoch on 2 ranks x 2
workers equals the straight run bit for bit, and the shipped multi-GPU recipes' data settings run 2 epochs on 2 and 3
processes. Every run has a hard timeout: a hang fails the test instead of stalling CI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import console_script

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 600  # seconds a run may take before it counts as a hang


def _build(root: Path, images: int, per_shard: int) -> Path:
    from vpa_lightning.data import build
    from vpa_lightning.data.demo import make_demo

    ann = make_demo(root / "data", num_images=images, seed=0)
    build([str(ann)], root / "shards", val_fraction=0.1, max_samples_per_shard=per_shard)
    return root / "shards"


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """Train shards of 20, 20, 20 and the rest (they never split evenly over 3 ranks), one small val shard."""
    return _build(tmp_path_factory.mktemp("uneven"), images=60, per_shard=20)


def _split(shards: Path, name: str) -> list[dict]:
    return [e for e in json.loads((shards / "manifest.json").read_text())["shards"] if e["split"] == name]


def _keys(shards: Path, name: str) -> set[str]:
    import tarfile

    keys = set()
    for entry in _split(shards, name):
        with tarfile.open(shards / entry["path"]) as tf:
            keys |= {m.name.split("/")[-1].split(".")[0] for m in tf.getmembers() if m.isfile()}
    return keys


def _fit(tmp_path: Path, *args: str, devices: int, config: str | None = None) -> list[dict]:
    """``vpa fit`` (on ``config`` if given) on ``devices`` CPU processes under plain DDP; the ranks' probe records."""
    out = tmp_path / "probe"
    cmd = [
        console_script("vpa"), "fit", *([f"--config={config}"] if config else []),
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", "--trainer.strategy=ddp",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *args,
        "--trainer.callbacks+=tests.trainer.probe.RankProbe", f"--trainer.callbacks.out_dir={out}",
    ]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert [r["rank"] for r in ranks] == list(range(devices))
    return ranks


@pytest.mark.parametrize("workers", [0, 2])
def test_three_ranks_on_uneven_shards_run_two_epochs_with_each_sample_once(uneven_shards, tmp_path, workers) -> None:
    """3 ranks, shards of 20/20/20/14 samples, 2 epochs (epoch ends crossed), with validation (its sanity check
    and a pass each epoch): finishes; every rank runs the same steps; per epoch the ranks' keys are disjoint and
    together every training sample but fewer than ranks x workers x batch of them (the even split's remainder)."""
    from vpa_lightning.data.streams import even_quota

    batch = 4
    ranks = _fit(
        tmp_path, "--model.model_name_or_path=tiny:llava", "--model.lora_r=4", f"--data.train_shards={uneven_shards}",
        f"--data.batch_size={batch}", f"--data.num_workers={workers}", "--trainer.max_epochs=2",
        "--trainer.enable_checkpointing=false", devices=3,
    )
    train = _keys(uneven_shards, "train")
    streams = 3 * max(workers, 1)
    quota = even_quota(len(train), streams, batch)
    steps_per_epoch = quota * max(workers, 1) // batch
    assert [r["global_step"] for r in ranks] == [2 * steps_per_epoch] * 3
    for epoch in ("0", "1"):
        per_rank = [set(r["epochs"][epoch]) for r in ranks]
        assert all(len(r["epochs"][epoch]) == quota * max(workers, 1) for r in ranks)  # no sample twice on a rank
        assert sum(len(k) for k in per_rank) == len(set().union(*per_rank)), "two ranks trained on the same sample"
        seen = set().union(*per_rank)
        assert seen <= train and len(train - seen) < streams * batch
    assert ranks[0]["epochs"]["0"] != ranks[0]["epochs"]["1"]  # each epoch its own order
    val = [set(r["val_keys"]) for r in ranks]
    assert sum(len(v) for v in val) == len(set().union(*val)) and set().union(*val) == _keys(uneven_shards, "val")


@pytest.fixture(scope="module")
def penultimate_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA saved as transformers ships LLaVA-1.5: image features from the penultimate vision layer (-2)."""
    from vpa_lightning.models import build_tiny_vlm

    model_dir = tmp_path_factory.mktemp("llava-penultimate")
    model, processor = build_tiny_vlm("llava")
    model.config.vision_feature_layer = -2
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_trainable_vision_tower_trains_under_ddp_and_fsdp(penultimate_llava, uneven_shards, tmp_path, strategy) -> None:
    """LLaVA-1.5's layout (its vision tower's last layer and post_layernorm never run), full fine-tuning with the
    vision tower trainable on 2 ranks: plain `--trainer.strategy ddp` (no find_unused_parameters) failed with
    "parameters that were not used in producing the loss"; the unused ones are now frozen and it trains, and so does
    Lightning's FSDPStrategy (a CPU subclass, tests/trainer/cpu_fsdp.py) with the same frozen parameters."""
    extra = (("--trainer.strategy=tests.trainer.cpu_fsdp.CPUFSDPStrategy", f"--trainer.strategy.out_dir={tmp_path / 'fsdp'}")
             if strategy == "fsdp" else ())
    ranks = _fit(
        tmp_path, f"--model.model_name_or_path={penultimate_llava}", "--model.lora=false", "--model.freeze_vision=false",
        f"--data.train_shards={uneven_shards}", "--data.batch_size=2", "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false", *extra, devices=2,
    )
    assert [r["global_step"] for r in ranks] == [3, 3]
    if strategy == "ddp":
        assert ranks[0]["params_sha"] == ranks[1]["params_sha"]  # DDP kept the replicas equal


def test_the_demo_config_trains_its_vision_tower_under_plain_ddp(uneven_shards, tmp_path) -> None:
    """The demo config as the issue ran it (full fine-tuning, vision tower trainable, its validation), one epoch on
    2 ranks with `--trainer.strategy ddp`."""
    ranks = _fit(
        tmp_path, f"--data.train_shards={uneven_shards}", "--trainer.callbacks=[]", "--trainer.max_epochs=1",
        f"--model.reference_cache_dir={tmp_path / 'ref'}", "--trainer.enable_checkpointing=false", devices=2,
        config="configs/demo.yaml",
    )
    assert len({r["global_step"] for r in ranks}) == 1 and ranks[0]["global_step"] > 0


def test_resume_mid_epoch_on_two_ranks_and_two_workers_is_exact(uneven_shards, tmp_path) -> None:
    """2 ranks x 2 DataLoader workers: 3 steps, a checkpoint, a resume to 6 steps equals 6 straight steps on every
    rank: the same samples in the same order, the same losses and the same weights, bit for bit."""
    common = ("--model.model_name_or_path=tiny:llava", "--model.lora_r=4", f"--data.train_shards={uneven_shards}",
              "--data.batch_size=2", "--data.num_workers=2", "--trainer.limit_val_batches=0", "--seed_everything=0",
              "--trainer.max_steps=6")
    straight = _fit(tmp_path / "straight", *common, devices=2)
    # stopped after 3 steps (an odd number: the resumed pass must start with worker 1's stream)
    first = _fit(tmp_path / "first", *common, "--trainer.callbacks+=tests.trainer.probe.StopAt",
                 "--trainer.callbacks.steps=3", devices=2)
    (ckpt,) = (tmp_path / "first" / "checkpoints").glob("*.ckpt")
    resumed = _fit(tmp_path / "resumed", *common, f"--ckpt_path={ckpt}", devices=2)
    for s, a, b in zip(straight, first, resumed):
        assert s["keys"] == a["keys"] + b["keys"] and len(b["keys"]) == 6
        assert s["losses"] == a["losses"] + b["losses"]
        assert s["params_sha"] == b["params_sha"]


#: (recipe, tiny stand-in of its model, ranks): the multi-GPU recipes with their data settings (batch size,
#: DataLoader workers, max_length, seed) and 2 epochs, on 2 and 3 CPU processes
RECIPES = [("seva_llava15_7b", "tiny:llava", 2), ("silkie_qwen_vl", "tiny:qwen2_vl", 3), ("mmdpo_llava15_13b", "tiny:llava", 3)]


@pytest.fixture(scope="module")
def recipe_shards(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("recipes"), images=200, per_shard=45)


@pytest.mark.parametrize(("recipe", "model", "devices"), RECIPES)
def test_shipped_multi_gpu_recipes_data_path(recipe, model, devices, recipe_shards, tmp_path) -> None:
    import yaml

    data = yaml.safe_load((ROOT / "configs" / f"{recipe}.yaml").read_text())["data"]
    assert data["num_workers"] > 1  # the settings under test: several workers per rank
    ranks = _fit(
        tmp_path, f"--model.model_name_or_path={model}", "--model.dtype=null",
        f"--model.reference_cache_dir={tmp_path / 'ref'}", "--trainer.precision=32-true", "--trainer.callbacks=[]",
        "--trainer.max_epochs=2", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
        f"--data.train_shards={recipe_shards}", devices=devices, config=f"configs/{recipe}.yaml",
    )
    steps = {r["global_step"] for r in ranks}
    assert len(steps) == 1 and steps.pop() > 0
    for epoch in ("0", "1"):
        per_rank = [r["epochs"][epoch] for r in ranks]
        assert len({len(k) for k in per_rank}) == 1
        assert sum(len(k) for k in per_rank) == len(set().union(*map(set, per_rank)))


def test_rank_and_worker_split_for_a_world_size_that_is_not_a_power_of_two(uneven_shards, tiny_llava, monkeypatch) -> None:
    """The even split in-process (no trainer): 3 ranks x 3 workers read disjoint ranges of the epoch's sequence, each
    its quota, together every sample but the remainder; evaluation splits every sample exactly once."""
    from vpa_lightning import PreferenceDataModule
    from vpa_lightning.data.streams import even_quota

    dm = PreferenceDataModule(str(uneven_shards), processor=tiny_llava[1], batch_size=2, num_workers=3, shuffle_buffer=0)
    monkeypatch.setattr(dm, "_world_size", lambda: 3)
    train, val = _keys(uneven_shards, "train"), _keys(uneven_shards, "val")
    for split, urls, is_train in (("train", dm.train_urls, True), ("val", dm.val_urls, False)):
        stream = dm.dataset(urls, is_train)
        seen: list[list[str]] = []
        for rank in range(3):
            for worker in range(3):
                monkeypatch.setattr("webdataset.utils.pytorch_worker_info", lambda r=rank, w=worker: (r, 3, w, 3))
                seen.append([e.key for e in stream])
        flat = [k for s in seen for k in s]
        assert len(flat) == len(set(flat))
        if is_train:
            quota = even_quota(len(train), 9, 2)
            assert all(len(s) == quota for s in seen) and len(stream) == 3 * quota
            assert set(flat) <= train and len(train - set(flat)) < 9 * 2
        else:
            assert set(flat) == val and max(map(len, seen)) - min(map(len, seen)) <= 1


def test_too_few_samples_or_uncountable_shards_name_the_flag(uneven_shards, tiny_llava, monkeypatch) -> None:
    from vpa_lightning import PreferenceDataModule
    from vpa_lightning.errors import UsageError

    dm = PreferenceDataModule(str(uneven_shards), processor=tiny_llava[1], batch_size=64, num_workers=2)
    monkeypatch.setattr(dm, "_world_size", lambda: 3)
    with pytest.raises(UsageError, match="--data.batch_size 64: 3 devices x 2 DataLoader worker"):
        dm.dataset(dm.train_urls, True)
    remote = PreferenceDataModule("pipe:cat x.tar", processor=tiny_llava[1])
    monkeypatch.setattr(remote, "_world_size", lambda: 2)
    with pytest.raises(UsageError, match="--data.groups_per_epoch"):
        remote.dataset(remote.train_urls, True)


def test_sample_counts_without_a_manifest_come_from_the_tar_headers(uneven_shards, tmp_path) -> None:
    from vpa_lightning.data.shardlist import count_samples

    for entry in _split(uneven_shards, "train"):
        assert count_samples(str(uneven_shards / entry["path"])) == entry["samples"]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert count_samples(str(empty)) == 0



def test_unused_vision_parameters_are_frozen_through_peft_copies(tmp_path) -> None:
    """LoRA with the vision tower trained (PEFT ``modules_to_save`` copies) and full fine-tuning: the parameters the
    forward never uses are frozen in the trained copy too; with the vision tower frozen nothing changes."""
    from vpa_lightning import VisionDPOModule

    unused = lambda m: sorted(n for n, p in m.model.named_parameters() if "post_layernorm" in n and p.requires_grad)  # noqa: E731
    for lora in (True, False):
        assert unused(VisionDPOModule("tiny:llava", lora=lora, freeze_vision=False)) == []
        trained = [n for n, p in VisionDPOModule("tiny:llava", lora=lora, freeze_vision=False).model.named_parameters()
                   if p.requires_grad and "vision_tower" in n]
        assert trained  # the rest of the tower still trains


def test_ddp_settings_are_chosen_before_the_wrap(monkeypatch) -> None:
    """Plain DDP over 2 processes: no per-forward buffer broadcast; find_unused_parameters stays off for a family
    whose unused parameters vpa knows (frozen), is switched on, with one line saying why, for another model type
    with trainable base weights, and is left alone when the strategy was given it."""
    import logging
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from vpa_lightning import VisionDPOModule

    from lightning.fabric.plugins.environments import LightningEnvironment

    def settings(module, **given):
        env = LightningEnvironment()
        env.set_world_size(2)
        strategy = DDPStrategy(parallel_devices=[torch.device("cpu")] * 2, cluster_environment=env, **given)
        monkeypatch.setattr(module, "_trainer", SimpleNamespace(strategy=strategy))
        module._ddp_settings()
        return strategy._ddp_kwargs

    module = VisionDPOModule("tiny:llava", lora=False, freeze_vision=False)
    assert settings(module) == {"broadcast_buffers": False}
    module.model.config.model_type = "some_new_vlm"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vpa_lightning.module").addHandler(handler)
    logging.getLogger("vpa_lightning.module").setLevel(logging.INFO)
    try:
        assert settings(module) == {"broadcast_buffers": False, "find_unused_parameters": True}
    finally:
        logging.getLogger("vpa_lightning.module").removeHandler(handler)
    assert any("some_new_vlm" in r.getMessage() for r in records)
    assert settings(module, find_unused_parameters=False, broadcast_buffers=True) == {
        "find_unused_parameters": False, "broadcast_buffers": True}
    lora_only = VisionDPOModule("tiny:llava")  # LoRA on the language model: every trainable weight is used
    lora_only.model.config.model_type = "some_new_vlm"
    assert settings(lora_only) == {"broadcast_buffers": False}
