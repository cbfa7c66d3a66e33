"""Loss x family matrix: every loss trains 2 steps through the `vpa fit` CLI on a tiny model of each family.

Each (loss, family) cell is one in-process ``cli_main`` fit (the CLI builds module, data module and trainer
from the same arguments as ``vpa fit``), once with prefix sharing off and once on (the two paths' equality
per family is tested in ``tests/models`` and ``test_methods_module.py``). The log-prob passes are counted: a reference-free loss
makes exactly one (the policy's) per step, a reference loss two, KTO four (policy and reference on the batch
and on its mismatched rows), mDPO four (the corrupted-image pair). One cell runs through the `vpa` console
script from its config files.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpa_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("llava", "qwen2_vl", "idefics3")
L = "vpa_lightning.losses."

# (id, class_path, init_args as CLI pairs, log-prob passes per step, extra CLI args)
LOSSES = [
    ("dpo", "DPOLoss", [], 2, []),
    ("ipo", "IPOLoss", [], 2, []),
    ("hinge", "HingeLoss", [], 2, []),
    ("robust", "RobustDPOLoss", ["label_smoothing", "0.1"], 2, []),
    ("rpo", "RPOLoss", ["nll_reduction", "token"], 2, []),
    ("mdpo", "MDPOLoss", [], 4, []),
    ("simpo", "SimPOLoss", [], 1, []),
    ("orpo", "ORPOLoss", [], 1, []),
    ("bco_pair", "BCOPairLoss", [], 2, []),
    ("apo_zero", "APOZeroLoss", [], 2, []),
    ("apo_down", "APODownLoss", [], 2, []),
    ("exo", "EXOLoss", [], 2, []),
    ("nca", "NCALoss", [], 2, []),
    ("sppo_hard", "SPPOHardLoss", [], 2, []),
    ("kto", "KTOLoss", [], 4, ["--data.unpaired", "threshold:3.5"]),
    ("plackett_luce", "PlackettLuceLoss", [], 2, []),
    ("lipo_lambda", "LiPOLambdaLoss", ["rank_by", "score"], 2, []),
    ("wpo", "DPOLoss", ["pair_weighting", "wpo"], 2, []),
    ("ld_dpo", "DPOLoss", ["ld_alpha", "0.5"], 2, []),
    ("weighted", "DPOLoss", ["pair_weighting", "probability", "beta_margin_scale", "0.5"], 2, []),
    ("mpo", "CombinedLoss", None, 2, ["--config", str(ROOT / "configs" / "loss_mpo.yaml")]),
    ("simpo_sft", "CombinedLoss", None, 1, []),
]
CELLS = [(loss, family, share) for loss in LOSSES for family in FAMILIES for share in (False, True)]


def _loss_args(name: str, cls: str, init: list[str] | None) -> list[str]:
    if name == "simpo_sft":
        spec = (
            '{"class_path": "vpa_lightning.losses.CombinedLoss", "init_args": {"losses": ['
            '{"class_path": "vpa_lightning.losses.SimPOLoss"}, {"class_path": "vpa_lightning.losses.SFTLoss"}], '
            '"weights": [1.0, 0.5]}}'
        )
        return ["--model.loss", spec]
    if init is None:
        return []  # from the stacked config
    args = ["--model.loss", L + cls]
    for key, value in zip(init[::2], init[1::2]):
        args += [f"--model.loss.{key}", value]
    return args


@pytest.mark.parametrize(
    "loss,family,share", CELLS, ids=[f"{c[0][0]}-{c[1]}-{'prefix' if c[2] else 'plain'}" for c in CELLS]
)
def test_every_loss_trains_on_every_family(loss, family, share, demo_shards, tmp_path):
    name, cls, init, passes_per_step, extra = loss
    args = [
        *extra,
        "--model.model_name_or_path", f"tiny:{family}",
        *_loss_args(name, cls, init),
        "--model.prefix_sharing", str(share).lower(),
        "--model.lora_r", "4",
        "--model.learning_rate", "1e-2",
        "--data.train_shards", str(demo_shards),
        "--data.batch_size", "2",
        "--data.shuffle_buffer", "0",
        "--data.max_length", "160",
        "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),
    ]
    torch.manual_seed(0)
    cli = cli_main(args, run=False)
    module = cli.model
    assert type(module.loss_fn).__name__ == cls
    passes = [0]
    logps = module._logps

    def counted(*a, **k):
        passes[0] += 1
        return logps(*a, **k)

    module._logps = counted
    module.configure_model()  # the weights exist from here (Lightning would create them in fit)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    cli.trainer.fit(module, cli.datamodule)
    assert cli.trainer.global_step == 2
    assert passes[0] == 2 * passes_per_step, f"{passes[0]} log-prob passes in 2 steps"
    if module.loss_fn.reference_free:
        assert module.reference is None and module.reference_cache is None
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss)
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if n in before)


def test_console_script_trains_a_reference_free_loss(demo_shards, tmp_path):
    """`vpa fit --config configs/demo.yaml --config configs/loss_simpo.yaml` through the installed console script."""
    vpa = Path(sys.executable).parent / "vpa"
    if not vpa.exists():
        pytest.skip("the vpa console script is not installed in this environment")
    cmd = [
        str(vpa), "fit",
        "--config", str(ROOT / "configs" / "demo.yaml"),
        "--config", str(ROOT / "configs" / "loss_simpo.yaml"),
        "--model.model_name_or_path", "tiny:llava",
        "--data.train_shards", str(demo_shards),
        "--model.reference_cache_dir", str(tmp_path / "cache"),
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.max_steps", "2",
        "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "1",
        "--trainer.callbacks", "[]",
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()  # reference-free: the demo's reference cache is never opened
