"""Exact resume: 2 steps + resume from the step-2 checkpoint + 2 steps equals 4 straight steps bit
for bit on CPU (weights, per-step losses and sample keys), mid-epoch and at an epoch boundary, with
and without DataLoader workers; a resume that cannot be exact says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """About 8 training groups in several shards (so workers get shards of their own)."""
    from vpa_lightning.data import build
    from vpa_lightning.data.demo import make_demo

    root = tmp_path_factory.mktemp("resume")
    ann = make_demo(root / "data", num_images=8, seed=3, bad_records=False)
    build([str(ann)], root / "shards", val_fraction=0.2, max_samples_per_shard=3)
    return root / "shards"


def _fit(shards: Path, root: Path, stop_at: int, *, batch_size: int, num_workers: int = 0, ckpt: Path | None = None, epoch_end: bool = False,
         compile_layers: bool = False):
    """A 4-step run (its LR schedule spans 4 steps) that stops after ``stop_at`` steps, like a killed one."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from vpa_lightning import PreferenceDataModule, VisionDPOModule

    class Record(Callback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, list[str]]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((float(outputs["loss"]), list(batch["keys"])))
            trainer.should_stop = trainer.global_step >= stop_at

    pl.seed_everything(0)
    module = VisionDPOModule("tiny:llava", lora_r=4, learning_rate=1e-2, warmup_ratio=0.0,  # LoRA dropout draws from the RNG
                             compile_layers=compile_layers)
    data = PreferenceDataModule(str(shards), batch_size=batch_size, num_workers=num_workers, shuffle_buffer=4, max_length=128, seed=5)
    saver = (
        ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
        if epoch_end
        else ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=2)
    )
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, logger=False, callbacks=[record, saver], limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, data, ckpt_path=ckpt)
    weights = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    return record.steps, weights, trainer


def _assert_resume_is_exact(shards, tmp_path, *, batch_size, num_workers=0, epoch_end=False, compile_layers=False):
    opts = {"batch_size": batch_size, "num_workers": num_workers, "compile_layers": compile_layers}
    straight, w_straight, _ = _fit(shards, tmp_path / "a", 4, **opts)
    first, _, _ = _fit(shards, tmp_path / "b", 2, epoch_end=epoch_end, **opts)
    (ckpt,) = (tmp_path / "b").glob("*step=2*.ckpt")
    resumed, w_resumed, trainer = _fit(shards, tmp_path / "c", 4, ckpt=ckpt, **opts)
    assert trainer.global_step == 4
    assert [k for _, k in first + resumed] == [k for _, k in straight]  # the same samples, in order
    assert [x for x, _ in first + resumed] == [x for x, _ in straight]  # the same losses, bit for bit
    assert w_resumed.keys() == w_straight.keys()
    assert all(torch.equal(w_resumed[k], w_straight[k]) for k in w_straight)
    return straight


def test_resume_mid_epoch_is_exact(small_shards, tmp_path):
    straight = _assert_resume_is_exact(small_shards, tmp_path, batch_size=1)
    assert len({k for _, keys in straight for k in keys}) == 4  # 4 distinct samples: step 2 does not restart the epoch


def _train_groups(shards: Path) -> int:
    import json

    return sum(s["samples"] for s in json.loads((shards / "manifest.json").read_text())["shards"] if s["split"] == "train")


def test_resume_at_an_epoch_boundary_is_exact(small_shards, tmp_path):
    """Two steps per epoch; the checkpoint is written at the end of epoch 0, the resumed run starts epoch 1
    (whose shard order and buffer shuffle come from the epoch counter, not from a fresh stream)."""
    n = _train_groups(small_shards)
    batch_size = -(-n // 2)
    straight = _assert_resume_is_exact(small_shards, tmp_path, batch_size=batch_size, epoch_end=True)
    epoch0, epoch1 = straight[:2], straight[2:]
    assert sorted(k for _, ks in epoch0 for k in ks) == sorted(k for _, ks in epoch1 for k in ks)  # a full pass each
    assert [ks for _, ks in epoch0] != [ks for _, ks in epoch1]  # reshuffled per epoch


def test_resume_with_workers_is_exact(small_shards, tmp_path):
    _assert_resume_is_exact(small_shards, tmp_path, batch_size=1, num_workers=2)


def test_resume_with_compiled_blocks_is_exact(small_shards, tmp_path):
    """--model.compile_layers with LoRA dropout on: the compiled blocks draw their dropout masks from torch's RNG,
    which the checkpoint restores, so the resumed run is the straight one bit for bit."""
    _assert_resume_is_exact(small_shards, tmp_path, batch_size=1, compile_layers=True)


def test_resume_warns_when_the_shards_changed(small_shards, tmp_path, caplog):
    from vpa_lightning import PreferenceDataModule

    data = PreferenceDataModule(str(small_shards), batch_size=1, seed=5)
    state = data.state_dict()
    state["fingerprint"]["shards"][0][1] = "0" * 64  # a shard rebuilt since
    state["epoch"], state["positions"] = 0, {"0/0": 3}
    with caplog.at_level(logging.WARNING, logger="vpa_lightning.data.datamodule"):
        PreferenceDataModule(str(small_shards), batch_size=1, seed=5).load_state_dict(state)
    assert "resume is not exact: shards changed" in caplog.text
    caplog.clear()
    other = PreferenceDataModule(str(small_shards), batch_size=1, seed=5, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="vpa_lightning.data.datamodule"):
        other.load_state_dict(data.state_dict())
    assert "num_workers" in caplog.text and other._resume is None


def test_resume_from_the_checkpoint_written_as_an_epoch_ended_runs_the_next_epoch(small_shards, tmp_path):
    """A 2-epoch fit killed in its second epoch resumes from the checkpoint Lightning's default ModelCheckpoint wrote
    as the first epoch ended: the second epoch runs whole and the weights equal the uninterrupted run's. (Lightning
    creates the loader there while current_epoch still names the finished epoch; replaying that epoch's stream to
    its end gave the resumed epoch no batch, and the fit ended a whole epoch short, in silence.)"""
    import lightning.pytorch as pl

    from vpa_lightning import PreferenceDataModule, VisionDPOModule

    def fit(root, ckpt=None, kill_at=None):
        pl.seed_everything(0)
        module = VisionDPOModule("tiny:llava", lora_r=4, lora_dropout=0.0, learning_rate=1e-2)
        data = PreferenceDataModule(str(small_shards), batch_size=2, shuffle_buffer=4, max_length=128, seed=5)
        steps = []

        class Kill(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                steps.append(list(batch["keys"]))
                if kill_at is not None and trainer.global_step == kill_at:
                    raise KeyError("killed")

        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, callbacks=[Kill()], limit_val_batches=0,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
        trainer.fit(module, data, ckpt_path=ckpt)
        return steps, {k: v.detach().clone() for k, v in module.model.state_dict().items()}, trainer

    straight, w_straight, t = fit(tmp_path / "a")
    per_epoch = t.global_step // 2
    with pytest.raises(KeyError, match="killed"):
        fit(tmp_path / "b", kill_at=per_epoch + 1)
    (ckpt,) = (tmp_path / "b").rglob("*.ckpt")
    resumed, w_resumed, t2 = fit(tmp_path / "b", ckpt=str(ckpt))
    assert t2.global_step == t.global_step and resumed == straight[per_epoch:]
    assert all(torch.equal(w_resumed[k], w_straight[k]) for k in w_straight)
