"""ThroughputLog: tokens/s, pairs/s and samples/s reach the logger every log_every_n_steps; on by default in `vpa fit`."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("torch")
import lightning.pytorch as pl  # noqa: E402

from vpa_lightning import PreferenceDataModule, VisionDPOModule  # noqa: E402
from vpa_lightning.callbacks import ThroughputLog  # noqa: E402


def test_throughput_metrics_reach_the_logger(demo_shards, tmp_path):
    module = VisionDPOModule("tiny:llava", lora_r=4, lora_alpha=8)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2, shuffle_buffer=8)
    callback = ThroughputLog()
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=2, limit_val_batches=0,
        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
    )
    trainer.fit(module, dm)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/throughput/pairs_per_s")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # every 2nd step (0-based), as the trainer logs
    for row in rows:
        tokens, pairs, samples = (float(row[f"train/throughput/{k}_per_s"]) for k in ("tokens", "pairs", "samples"))
        assert tokens > samples > 0 and pairs > 0
        # demo groups have >= 2 responses, each a sequence of many tokens: the ratios follow the data
        assert tokens / samples > 20
    assert "train/throughput/mfu" not in rows[0]  # no peak FLOPs known on CPU
    assert set(callback.last) == {"train/throughput/tokens_per_s", "train/throughput/pairs_per_s", "train/throughput/samples_per_s"}


def test_on_by_default_in_the_cli():
    from vpa_lightning.cli import cli_main

    cli = cli_main(["--model.model_name_or_path", "tiny:llava", "--data.train_shards", "x.tar"], run=False)
    assert sum(isinstance(c, ThroughputLog) for c in cli.trainer.callbacks) == 1
