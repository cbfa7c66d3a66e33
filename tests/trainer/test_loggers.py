"""Loggers: TensorBoard (the Trainer's default when installed) and W&B in offline mode, no network."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")
import lightning.pytorch as pl  # noqa: E402

from vpa_lightning import PreferenceDataModule, VisionDPOModule  # noqa: E402

TRAIN_METRICS = ["train/loss", "train/rewards/accuracies", "train/logps/chosen"]


def fit_two_steps(demo_shards, tmp_path, logger):
    module = VisionDPOModule("tiny:llava", lora_r=4, lora_alpha=8)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2, shuffle_buffer=8)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=logger, log_every_n_steps=1, limit_val_batches=0,
        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    return trainer


def test_tensorboard_is_the_default_logger(demo_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = fit_two_steps(demo_shards, tmp_path, logger=True)
    assert isinstance(trainer.logger, pl.loggers.TensorBoardLogger)
    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(TRAIN_METRICS) <= tags, sorted(tags)
    assert all(math.isfinite(e.value) for e in acc.Scalars("train/loss"))


def test_wandb_offline_needs_no_network(demo_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = pl.loggers.WandbLogger(project="vpa-test", offline=True, save_dir=str(tmp_path))
    trainer = fit_two_steps(demo_shards, tmp_path, logger)
    run = logger.experiment
    assert set(TRAIN_METRICS) <= set(run.summary.keys()), sorted(run.summary.keys())
    run.finish()
    assert list(tmp_path.rglob("offline-run-*")), "no offline run directory written"
    assert trainer.global_step == 2
