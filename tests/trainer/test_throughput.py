"""ThroughputLog: tokens/s, pairs/s and samples/s reach the logger every log_every_n_steps; on by default in `vpa fit`."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("torch")
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

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
    # one given on the command line (a peak for an unlisted device) replaces the default, not beside it
    cli = cli_main(["--model.model_name_or_path", "tiny:llava", "--data.train_shards", "x.tar",
                    "--trainer.callbacks+=vpa_lightning.callbacks.ThroughputLog", "--trainer.callbacks.peak_tflops", "312"],
                   run=False)
    assert [c.peak_tflops for c in cli.trainer.callbacks if isinstance(c, ThroughputLog)] == [312.0]


def test_mfu_with_a_given_peak_follows_the_flops_formula(demo_shards, tmp_path):
    """With ``peak_tflops`` given (any device, CPU here) MFU is logged: tflops_per_s is the model FLOPs per
    token (flops_per_token) times tokens/s, and mfu is that over the peak. Plain groups (not packed), so the
    FLOPs are counted on every token of the batch."""
    from vpa_lightning.callbacks import flops_per_token

    module = VisionDPOModule("tiny:llava", lora_r=4, lora_alpha=8, packed=False)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2, shuffle_buffer=8)
    callback = ThroughputLog(peak_tflops=0.5)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
    )
    trainer.fit(module, dm)
    m = callback.last
    embeddings = {id(p) for e in module.modules() if isinstance(e, torch.nn.Embedding) for p in e.parameters()}
    params = [p for p in module.parameters() if id(p) not in embeddings]
    per_token = flops_per_token(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
    assert per_token > 6 * sum(p.numel() for p in params)  # 3 forwards' worth + the adapters' gradients
    assert m["train/throughput/tflops_per_s"] * 1e12 == pytest.approx(per_token * m["train/throughput/tokens_per_s"], rel=1e-9)
    assert m["train/throughput/mfu"] == pytest.approx(m["train/throughput/tflops_per_s"] / 0.5, rel=1e-9)
    with pytest.raises(ValueError, match="peak_tflops"):
        ThroughputLog(peak_tflops=0)


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [("NVIDIA H200", torch.bfloat16, 989.4e12), ("NVIDIA H200 NVL", torch.bfloat16, 835e12),
     ("NVIDIA H100 80GB HBM3", torch.float16, 989.4e12), ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
     ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12)],
)
def test_peak_flops_is_the_dense_datasheet_figure(monkeypatch, name, dtype, peak):
    """torch names the H200 "NVIDIA H200", which Lightning's table misses; the peak is the dense figure."""
    from vpa_lightning.callbacks import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), dtype) == peak
    assert peak_flops(torch.device("cpu"), dtype) is None


def test_flop_params_count_a_full_fine_tuning_reference_once(demo_shards, tmp_path):
    """Full fine-tuning holds a frozen reference copy: N is the policy's, not twice it (the formula's
    reference term is that copy's forward)."""
    from vpa_lightning.callbacks import flop_params

    module = VisionDPOModule("tiny:llava", lora=False)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, PreferenceDataModule(str(demo_shards), batch_size=2, shuffle_buffer=8))
    assert module.reference_model is not None
    policy = module.model
    embeddings = {id(p) for m in policy.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    counted = [p for p in policy.parameters() if id(p) not in embeddings]
    expected = (sum(p.numel() for p in counted), sum(p.numel() for p in counted if p.requires_grad))
    assert 0 < expected[1] < expected[0]  # the vision tower is frozen (freeze_vision), the language model trains
    assert flop_params(module) == expected  # the reference's parameters are not counted


def test_garbage_collection_runs_between_steps_on_a_schedule(demo_shards, tmp_path, monkeypatch):
    """During fit the automatic collector is off and what was alive at the start is frozen; every
    ``every_n_steps`` the callback collects; afterwards (and after a failing step) the collector is as found."""
    import gc

    from vpa_lightning.callbacks import GarbageCollection

    collected, seen = [], []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(a) or real_collect(*a))

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((gc.isenabled(), gc.get_freeze_count() > 0))

    def fit(module, steps):
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, callbacks=[GarbageCollection(every_n_steps=2), Probe()])
        trainer.fit(module, PreferenceDataModule(str(demo_shards), batch_size=2, shuffle_buffer=8))

    assert gc.isenabled()
    fit(VisionDPOModule("tiny:llava", lora_r=4, lora_alpha=8), 5)
    assert seen == [(False, True)] * 5
    assert len(collected) == 1 + 2  # at the start, then after steps 2 and 4
    assert gc.isenabled() and gc.get_freeze_count() == 0

    class Failing(VisionDPOModule):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(Failing("tiny:llava", lora_r=4, lora_alpha=8), 3)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="every_n_steps"):
        GarbageCollection(every_n_steps=0)


def test_garbage_collection_is_on_by_default_in_the_cli():
    from vpa_lightning.callbacks import GarbageCollection
    from vpa_lightning.cli import cli_main

    cli = cli_main(["--model.model_name_or_path", "tiny:llava", "--data.train_shards", "x.tar"], run=False)
    assert sum(isinstance(c, GarbageCollection) for c in cli.trainer.callbacks) == 1
    cli = cli_main(["--model.model_name_or_path", "tiny:llava", "--data.train_shards", "x.tar",
                    "--trainer.callbacks+=vpa_lightning.callbacks.GarbageCollection",
                    "--trainer.callbacks.every_n_steps", "7"], run=False)
    assert [c.every_n_steps for c in cli.trainer.callbacks if isinstance(c, GarbageCollection)] == [7]


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    import importlib.metadata

    from vpa_lightning.cli import allocator_defaults

    env = {}
    name = allocator_defaults(env)
    major, minor = (int(x) for x in importlib.metadata.version("torch").split(".")[:2])
    assert name == ("PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF")
    assert env == {name: "expandable_segments:True"}
    for user in ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}):
        env = dict(user)
        assert allocator_defaults(env) is None and env == user
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.8.1")
    env = {}
    assert allocator_defaults(env) == "PYTORCH_CUDA_ALLOC_CONF"
