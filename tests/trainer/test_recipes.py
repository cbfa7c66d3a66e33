"""Paper recipe configs (SeVa, Silkie, MM-DPO): parsed values, DeepSpeed JSONs, the FSDP fragment.

Parsing only (``--print_config``): the recipes name hub models, which tests never download, and
DeepSpeed is not needed to *parse* ``trainer.strategy`` (jsonargparse resolves the class, builds nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vpa_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = "lightning.pytorch.strategies.DeepSpeedStrategy"

# config -> (model id, expected model values, expected trainer values, expected data values, ZeRO stage)
RECIPES = {
    "seva_llava15_7b.yaml": (
        "llava-hf/llava-1.5-7b-hf",
        {"lora_r": 1024, "lora_alpha": 2048, "learning_rate": 2e-6, "freeze_vision": True, "average_logps": False},
        {"max_epochs": 2, "precision": "bf16-mixed"},
        {"batch_size": 16},
        3,
    ),
    "silkie_qwen_vl.yaml": (
        "Qwen/Qwen2-VL-7B-Instruct",
        {
            "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 1e-5, "weight_decay": 0.05,
            "warmup_ratio": 0.1, "adam_betas": [0.9, 0.98], "freeze_vision": True,
        },
        {"max_epochs": 3, "precision": "bf16-mixed"},
        {},
        2,
    ),
    "mmdpo_llava15_13b.yaml": (
        "llava-hf/llava-1.5-13b-hf",
        {"lora_r": 128, "lora_alpha": 256, "average_logps": False},
        {"precision": "bf16-mixed"},
        {},
        3,
    ),
}


def _print_config(capsys, *configs: Path) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as exc:
        cli_main([*args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_values(name, capsys):
    model_id, model_values, trainer_values, data_values, stage = RECIPES[name]
    config = ROOT / "configs" / name
    assert config.read_text().splitlines()[0] == f"# python -m vpa_lightning.cli fit --config configs/{name}"
    printed = _print_config(capsys, config)
    model = printed["model"]
    assert model["model_name_or_path"] == model_id and model["lora"] is True
    assert model["loss"]["class_path"] == "vpa_lightning.losses.DPOLoss" and model["loss"]["init_args"]["beta"] == 0.1
    for key, value in model_values.items():
        assert model[key] == value, key
    for key, value in trainer_values.items():
        assert printed["trainer"][key] == value, key
    for key, value in data_values.items():
        assert printed["data"][key] == value, key
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == DEEPSPEED
    ds_path = ROOT / strategy["init_args"]["config"]  # relative to the repo root, where recipes are run
    ds = json.loads(ds_path.read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_deepspeed_json_fits_lightning(name):
    """Keys Lightning's DeepSpeedStrategy sets itself (or rejects) are absent; the client AdamW is allowed."""
    ds = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
    assert "gradient_accumulation_steps" not in ds  # Lightning raises: it comes from accumulate_grad_batches
    assert "train_micro_batch_size_per_gpu" not in ds  # filled from the dataloader's batch size
    assert "optimizer" not in ds and "scheduler" not in ds  # configure_optimizers provides them
    assert ds["zero_allow_untested_optimizer"] is True
    assert not any(v == "auto" for v in ds.values())  # HF-style "auto" strings are not understood by Lightning


def test_deepspeed_strategy_reads_json():
    """Lightning's own loader accepts the files (the strategy itself cannot be built without deepspeed)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    for name in ("zero2.json", "zero3.json"):
        path = ROOT / "configs" / "deepspeed" / name
        loaded = DeepSpeedStrategy._load_config(DeepSpeedStrategy.__new__(DeepSpeedStrategy), str(path))
        assert loaded == json.loads(path.read_text())


def test_fsdp_fragment_overrides_strategy(capsys):
    fragment = ROOT / "configs" / "strategies" / "fsdp.yaml"
    assert fragment.read_text().splitlines()[0].startswith("# Fragment, not a full config: python -m vpa_lightning.cli fit")
    printed = _print_config(capsys, ROOT / "configs" / "silkie_qwen_vl.yaml", fragment)
    assert printed["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert printed["trainer"]["strategy"]["init_args"]["sharding_strategy"] == "FULL_SHARD"
    assert printed["model"]["lora_r"] == 64  # the rest of the recipe is kept
