"""cli_main: every YAML in configs/ parses (--print_config); local-model ones also instantiate (run=False);
a short fit through the CLI. The paper recipes' values are checked in test_recipes.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from vpa_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
# the `vpa fit` recipes; every config (fit, seva, eval) is parsed by its own command in tests/test_configs.py
# (configs/loss_*.yaml are loss fragments stacked on a recipe: `--config configs/demo.yaml --config configs/loss_x.yaml`)
CONFIGS = [
    c
    for c in sorted((ROOT / "configs").glob("*.yaml"))
    if " fit --config" in c.read_text().splitlines()[0] and not c.name.startswith("loss_")
]


def _model_is_local(config: Path) -> bool:
    """``tiny:`` models and existing folders build offline; a hub id (``org/name``) would need a download."""
    name = yaml.safe_load(config.read_text())["model"]["model_name_or_path"]
    return name.startswith("tiny:") or (ROOT / name).exists() or (Path(name).is_absolute() and Path(name).exists())


LOCAL_CONFIGS = [c for c in CONFIGS if _model_is_local(c)]


def test_configs_exist():
    assert CONFIGS, "configs/ has no YAML"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["model_name_or_path"] == source["model"]["model_name_or_path"]
    assert printed["model"]["loss"]["class_path"].startswith("vpa_lightning.losses.")
    assert printed["data"]["train_shards"] == source["data"]["train_shards"]


@pytest.mark.parametrize("config", LOCAL_CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(config):  # hub-model recipes are only parsed (test_print_config): no downloads in tests
    cli = cli_main(["--config", str(config)], run=False)
    assert type(cli.model).__name__ == "VisionDPOModule" and type(cli.datamodule).__name__ == "PreferenceDataModule"
    source = yaml.safe_load(config.read_text())
    assert type(cli.model.loss_fn).__name__ == source["model"]["loss"]["class_path"].rsplit(".", 1)[-1]


def test_loss_choice_from_command_line():
    cli = cli_main(["--model.model_name_or_path", "tiny:idefics3", "--model.loss", "vpa_lightning.losses.IPOLoss", "--model.loss.beta", "0.5", "--data.train_shards", "x.tar"], run=False)
    assert type(cli.model.loss_fn).__name__ == "IPOLoss" and cli.model.loss_fn.beta == 0.5
    assert type(cli.model.model.get_base_model()).__name__ == "Idefics3ForConditionalGeneration"


def test_default_loss_is_dpo(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.model_name_or_path", "tiny:llava", "--data.train_shards", "x.tar", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["loss"]["class_path"] == "vpa_lightning.losses.DPOLoss"
    cli = cli_main(["--model.model_name_or_path", "tiny:llava", "--data.train_shards", "x.tar"], run=False)
    assert type(cli.model.loss_fn).__name__ == "DPOLoss" and cli.model.loss_fn.beta == 0.1


def test_fit_through_cli(demo_shards, tmp_path):
    demo = next(c for c in CONFIGS if c.name == "demo.yaml")
    cli = cli_main(
        [
            "fit",
            "--config", str(demo),
            "--data.train_shards", str(demo_shards),
            "--model.reference_cache_dir", str(tmp_path / "cache"),
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "2",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(tmp_path),
        ]
    )
    assert cli.trainer.global_step == 2
    assert "train/loss" in cli.trainer.logged_metrics and "val/loss" in cli.trainer.logged_metrics
    assert list((tmp_path / "cache").glob("reference-*.sqlite"))


def test_mdpo_fit_through_cli_with_a_seva_augmentation(demo_shards, tmp_path):
    """mDPO chosen by class_path; its corrupted image comes from the augmentation module (YAML spec)."""
    cli = cli_main(
        [
            "fit",
            "--model.model_name_or_path", "tiny:llava",
            "--model.loss", "vpa_lightning.losses.MDPOLoss",
            "--model.loss.anchor", "0.1",
            "--model.image_corruption", '{"name": "diffusion_noise", "step": 500}',
            "--data.train_shards", str(demo_shards),
            "--data.batch_size", "2",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false",
        ]
    )
    assert cli.trainer.global_step == 2 and type(cli.model.loss_fn).__name__ == "MDPOLoss"
    assert cli.model.loss_fn.anchor == 0.1
    assert type(cli.model._corruption[0]).__name__ == "DiffusionNoise" and cli.model._corruption[0].step == 500
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_help_documents_arguments(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    for option in ("--model.model_name_or_path", "--model.reference_cache_dir", "--data.train_shards", "--data.shuffle_buffer"):
        assert option in out
    assert "directory with" in out and "manifest.json" in out  # docstrings become help text


def test_import_is_lazy():
    import subprocess
    import sys

    code = (
        "import sys, vpa_lightning; assert 'torch' not in sys.modules and 'lightning' not in sys.modules; "
        "from vpa_lightning import VisionDPOModule, PreferenceDataModule; "
        "assert VisionDPOModule.__module__ == 'vpa_lightning.module'; "
        "assert PreferenceDataModule.__module__ == 'vpa_lightning.data.datamodule'"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_batch_moves_to_device(demo_shards, tiny_llava):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from vpa_lightning import PreferenceDataModule

    dm = PreferenceDataModule(str(demo_shards), batch_size=2, processor=tiny_llava[1])
    batch = move_data_to_device(next(iter(dm.val_dataloader())), "meta")  # what Lightning does before a step
    assert batch["chosen"].device.type == "meta" and batch["inputs"].labels.device.type == "meta"
    assert all(v.device.type == "meta" for v in batch["inputs"].model_inputs.values() if hasattr(v, "device"))


@pytest.mark.parametrize("tool", ["seva", "eval", "report", "export"])
def test_vpa_dispatches_its_tools(tool, capsys):
    """`vpa seva|eval|report|export` reach their own parsers; anything else goes to LightningCLI."""
    from vpa_lightning.cli import TOOLS, main

    assert tool in TOOLS
    with pytest.raises(SystemExit) as exc:
        main([tool, "--help"])
    assert exc.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out.lower()


_FAKE_DEEPSPEED = """
import logging, sys
log = logging.getLogger("DeepSpeed")
log.setLevel(logging.INFO)
log.propagate = False
log.addHandler(logging.StreamHandler(stream=sys.stdout))  # bound to stdout at import, as DeepSpeed's LoggerFactory does
log.warning("[real_accelerator.py] Setting accelerator to CPU")
"""


def test_print_config_stays_yaml_when_deepspeed_logs_at_import(tmp_path):
    """A config with DeepSpeedStrategy makes Lightning import DeepSpeed while parsing, and DeepSpeed logs
    to the stdout of that moment: `vpa fit --print_config > x.yaml` got its log line in the YAML. A stand-in
    package (DeepSpeed's logging set-up, a distribution record so Lightning sees it installed) replaces
    DeepSpeed, which CI does not install."""
    import os
    import subprocess
    import sys

    import yaml

    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "__init__.py").write_text(_FAKE_DEEPSPEED)
    (tmp_path / "deepspeed-0.16.0.dist-info").mkdir()
    (tmp_path / "deepspeed-0.16.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.16.0\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    config = root / "configs" / "mmdpo_llava15_13b.yaml"
    proc = subprocess.run([sys.executable, "-m", "vpa_lightning.cli", "fit", "--config", str(config), "--print_config"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Setting accelerator" in proc.stderr and "Setting accelerator" not in proc.stdout
    printed = yaml.safe_load(proc.stdout)
    assert "DeepSpeedStrategy" in str(printed["trainer"]["strategy"])
    # the console entry point lets LightningCLI read sys.argv itself: no "args parameter" warning on every run
    assert "args parameter is intended" not in proc.stderr
