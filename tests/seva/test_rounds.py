"""``vpa seva rounds``: generate -> DPO -> export -> regenerate with the new policy, each round apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

N_IMAGES = 6


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("rounds_images")
    for i in range(N_IMAGES):
        Image.new("RGB", (36 + 6 * i, 30), (40 * i, 250 - 35 * i, (70 * i) % 256)).save(root / f"img{i}.png")
    rows = [{"image": f"img{i}.png", "question": f"What is in picture {i}?"} for i in range(N_IMAGES)]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, root


def _fit_config(path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {"model_name_or_path": "tiny:llava", "lora": True, "lora_r": 4, "lora_alpha": 8, "learning_rate": 0.01},
        "data": {"train_shards": "set/per/round", "batch_size": 2, "max_length": 128},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_rounds_then_resume(prompts, tmp_path, monkeypatch):
    from vpa_lightning.cli import main
    from vpa_lightning.module import load_vlm

    prompts_file, image_root = prompts
    out = tmp_path / "rounds"
    rounds_yaml = tmp_path / "rounds.yaml"
    rounds_yaml.write_text(
        yaml.safe_dump(
            {
                "model": "tiny:llava",
                "prompts_file": str(prompts_file),
                "image_root": str(image_root),
                "out_dir": str(out),
                "fit_config": str(_fit_config(tmp_path / "fit.yaml")),
                "num_rounds": 2,
                "max_new_tokens": 6,
                "batch_size": 3,
            }
        )
    )
    summaries = main(["seva", "rounds", "--config", str(rounds_yaml)])
    assert [s["round"] for s in summaries] == [0, 1]
    r0, r1 = summaries
    # round 1 regenerates with round 0's exported policy, and each round keeps its own folders
    assert r0["model_in"] == "tiny:llava" and r1["model_in"] == r0["model_out"]
    for r, s in enumerate(summaries):
        d = out / f"round{r}"
        assert json.loads((d / "round.json").read_text()) == s
        assert (d / "pairs" / "rank0" / "manifest.json").exists()
        assert s["pairs"]["pairs_written"] > 0 and s["pairs"]["generated"] == N_IMAGES
        assert list((d / "train").rglob("*.ckpt")), "round's Lightning checkpoint"
        assert list((d / "reference-cache").glob("reference-*.sqlite")), "per-round reference cache"
        assert Path(s["adapter"]).is_dir() and Path(s["model_out"]).is_dir()
        assert "train/loss" in s["metrics"]
    # the exported policies are real, trained transformers models
    import torch

    base, _ = load_vlm("tiny:llava")
    m0, _ = load_vlm(r0["model_out"])
    m1, _ = load_vlm(r1["model_out"])
    w = {n: p for n, p in base.named_parameters() if "q_proj" in n and "language_model" in n}
    name = sorted(w)[0]
    p0, p1 = dict(m0.named_parameters())[name], dict(m1.named_parameters())[name]
    assert not torch.allclose(w[name], p0) and not torch.allclose(p0, p1)

    # a rerun resumes after the finished rounds: nothing is generated or trained again
    from vpa_lightning.seva import generate

    monkeypatch.setattr(generate, "generate_pairs", lambda *a, **k: pytest.fail("finished round regenerated"))
    assert main(["seva", "rounds", "--config", str(rounds_yaml)]) == summaries


def test_rounds_flag_checks(prompts, tmp_path):
    from vpa_lightning.seva.rounds import rounds

    prompts_file, image_root = prompts
    fit = _fit_config(tmp_path / "fit.yaml")
    with pytest.raises(ValueError, match="--num_rounds"):
        rounds("tiny:llava", str(prompts_file), str(image_root), str(tmp_path / "o"), str(fit), num_rounds=0)
    with pytest.raises(ValueError, match="--prompts_file"):
        rounds("tiny:llava", [str(prompts_file)] * 2, str(image_root), str(tmp_path / "o"), str(fit), num_rounds=3)
    with pytest.raises(FileNotFoundError, match="--fit_config"):
        rounds("tiny:llava", str(prompts_file), str(image_root), str(tmp_path / "o"), str(tmp_path / "nope.yaml"))


def test_round_with_no_pairs_stops_with_a_reason(prompts, tmp_path):
    from vpa_lightning.seva.rounds import rounds

    prompts_file, image_root = prompts
    fit = _fit_config(tmp_path / "fit.yaml")
    with pytest.raises(RuntimeError, match="round 0: no pairs to train on"):
        rounds("tiny:llava", str(prompts_file), str(image_root), str(tmp_path / "o"), str(fit), augmentation="none", max_new_tokens=4)
