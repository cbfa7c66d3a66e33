"""End to end: ``vpa eval`` on tiny POPE + MME + MMBench sets with the tiny LLaVA from four sources
(``tiny:`` name, a saved folder, base + PEFT adapter, a Lightning checkpoint); plus the CLI checks
and the shipped ``configs/eval_*.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.eval.test_benchmarks import (
    make_images,
    write_mmbench_tsv,
    write_mme,
    write_pope,
)
from vpa_lightning.eval.base import Benchmark, EvalItem
from vpa_lightning.eval.cli import main, parse_config
from vpa_lightning.eval.runner import ModelSpec, evaluate, format_table

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA saved as a plain folder, a zero-initialised LoRA adapter on it, and a checkpoint."""
    import lightning.pytorch as pl
    from peft import LoraConfig, get_peft_model

    from vpa_lightning.models import default_lora_targets, load_vlm
    from vpa_lightning.module import VisionDPOModule

    root = tmp_path_factory.mktemp("models")
    model, processor = load_vlm("tiny:llava", seed=0)
    model.save_pretrained(root / "saved")
    processor.save_pretrained(root / "saved")
    # LoRA B starts at zero: the adapter model computes exactly the base model's function
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=default_lora_targets(model))
    )
    peft_model.save_pretrained(root / "adapter")
    module = VisionDPOModule("tiny:llava", lora_r=2, lora_alpha=4, lora_dropout=0.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(root / "last.ckpt")
    return {
        "saved": root / "saved",
        "adapter": root / "adapter",
        "ckpt": root / "last.ckpt",
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    make_images(root / "images")
    write_pope(root / "coco_pope_random.json")
    write_mme(root / "mme.jsonl")
    write_mmbench_tsv(root / "mmbench.tsv")
    return root


def _config(tmp_path: Path, data: Path, models: list[dict], **extra) -> Path:
    import yaml

    imgs = str(data / "images")
    cfg = {
        "models": models,
        "benchmarks": [
            {
                "name": "pope",
                "file": str(data / "coco_pope_random.json"),
                "image_root": imgs,
            },
            {"name": "mme", "file": str(data / "mme.jsonl"), "image_root": imgs},
            {"name": "mmbench", "file": str(data / "mmbench.tsv"), "image_root": imgs},
        ],
        "out_dir": str(tmp_path / "out"),
        "batch_size": 4,
        "max_new_tokens": 3,
        "seed": 0,
        "device": "cpu",
        **extra,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_end_to_end_side_by_side(
    tmp_path: Path, data: Path, sources: dict[str, Path], capsys
) -> None:
    models = [
        {"name": "tiny", "path": "tiny:llava"},
        {"name": "saved", "path": str(sources["saved"])},
        {
            "name": "adapter",
            "path": str(sources["saved"]),
            "adapter": str(sources["adapter"]),
        },
        {"name": "ckpt", "checkpoint": str(sources["ckpt"])},
    ]
    results = main(["--config", str(_config(tmp_path, data, models))])
    out = tmp_path / "out"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert list(results["models"]) == ["tiny", "saved", "adapter", "ckpt"]
    benches = ["pope_random", "mme", "mmbench"]
    expected_keys = {
        "pope_random": {
            "accuracy",
            "precision",
            "recall",
            "f1",
            "yes_ratio",
            "unparsed",
            "n",
        },
        "mme": {
            "perception",
            "cognition",
            "total",
            "existence/score",
            "code_reasoning/score",
            "n",
        },
        "mmbench": {
            "circular_acc",
            "vanilla_acc",
            "circular_acc/animals",
            "vanilla_acc/colours",
            "n",
        },
    }
    for name, per_bench in results["models"].items():
        assert list(per_bench) == benches
        for b in benches:
            assert expected_keys[b] <= set(per_bench[b]), (name, b)
    # four sources of the same weights: identical metrics
    first = results["models"]["tiny"]
    assert all(results["models"][m] == first for m in ("saved", "adapter", "ckpt"))
    assert (
        first["pope_random"]["n"] == 4
        and first["mme"]["n"] == 4
        and first["mmbench"]["n"] == 2
    )
    # rejects by line (the same bad lines as in test_benchmarks) and counts
    assert sorted(r["line"] for r in results["rejects"]["pope_random"]) == [
        5,
        6,
        7,
        8,
        9,
        10,
    ]
    assert sorted(r["line"] for r in results["rejects"]["mmbench"]) == [4, 5, 6]
    assert results["counts"]["pope_random"] == {"lines": 10, "items": 4, "rejected": 6}
    assert results["counts"]["mme"] == {"lines": 6, "items": 4, "rejected": 2}
    assert results["counts"]["mmbench"] == {"lines": 5, "items": 7, "rejected": 3}
    # answer files: one line per item, identical across the identical models
    for b, n in (("pope_random", 4), ("mme", 4), ("mmbench", 7)):
        rows = [
            json.loads(x)
            for x in (out / "answers" / "tiny" / f"{b}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == n and set(rows[0]) == {
            "item_id",
            "question",
            "answer",
            "parsed",
        }
        assert (out / "answers" / "ckpt" / f"{b}.jsonl").read_text() == (
            out / "answers" / "tiny" / f"{b}.jsonl"
        ).read_text()
    table = capsys.readouterr().out
    assert (
        "pope_random/accuracy" in table
        and "Δ ckpt" in table
        and "mmbench/circular_acc" in table
    )
    assert not list(out.glob(".*tmp"))  # atomic writes left no temp file


def test_limit_keeps_groups_together(tmp_path: Path, data: Path) -> None:
    results = main(
        [
            "--config",
            str(_config(tmp_path, data, [{"name": "tiny", "path": "tiny:llava"}])),
            "--limit",
            "1",
        ]
    )
    counts = results["counts"]
    # one question of POPE, one MME image (two questions), one MMBench question (3 rotations)
    assert (
        counts["pope_random"]["items"] == 1
        and counts["mme"]["items"] == 2
        and counts["mmbench"]["items"] == 3
    )
    assert results["models"]["tiny"]["mmbench"]["n"] == 1


class _Echo(Benchmark):
    """A minimal non-rule benchmark: the runner must only rely on the contract."""

    name = "echo"

    def __init__(self, images: list[Path]) -> None:
        self.images = images

    def load(self):
        return [
            EvalItem(f"e{i}", p, "Describe.") for i, p in enumerate(self.images)
        ], []

    def score(self, items, answers):
        return {"mean_length": sum(len(a) for a in answers) / len(answers)}


def test_any_benchmark_and_image_failing_at_generation(
    tmp_path: Path, data: Path
) -> None:
    imgs = data / "images"
    bench = _Echo([imgs / "img0.png", imgs / "broken.png", imgs / "img1.png"])
    results = evaluate(
        [{"name": "m", "path": "tiny:llava"}],
        [bench, _Echo([imgs / "img2.png"])],
        tmp_path,
        max_new_tokens=2,
        device="cpu",
        print_table=False,
    )
    assert set(results["models"]["m"]) == {"echo", "echo_2"}
    assert "mean_length" in results["models"]["m"]["echo"]
    (reject,) = results["rejects"]["echo"]
    assert reject["line"] == 2 and "image failed to load" in reject["reason"]
    assert results["counts"]["echo"] == {"lines": 3, "items": 2, "rejected": 1}
    rows = (tmp_path / "answers" / "m" / "echo.jsonl").read_text().splitlines()
    assert [json.loads(r)["parsed"] for r in rows] == [None, None]


def test_format_table_deltas() -> None:
    table = format_table({"a": {"b": {"acc": 0.5}}, "c": {"b": {"acc": 0.75}}})
    header, _, row = table.splitlines()
    assert header.split()[:3] == ["metric", "a", "c"] and "Δ c" in header
    assert row.split() == ["b/acc", "0.5000", "0.7500", "+0.2500"]


@pytest.mark.parametrize(
    ("models", "extra", "flag"),
    [
        ([], {}, "--models"),
        ([{"name": "x"}], {}, "--models[0]"),  # neither path nor checkpoint
        (
            [{"name": "x", "path": "tiny:llava"}, {"name": "x", "path": "tiny:llava"}],
            {},
            "--models",
        ),
        ([{"name": "x", "path": "tiny:llava"}], {"batch_size": 0}, "--batch_size"),
        ([{"name": "x", "path": "tiny:llava"}], {"limit": 0}, "--limit"),
    ],
)
def test_cli_checks_name_the_flag(
    tmp_path: Path, data: Path, models, extra, flag, capsys
) -> None:
    with pytest.raises(SystemExit):
        main(["--config", str(_config(tmp_path, data, models, **extra))])
    assert flag in capsys.readouterr().err


def test_cli_rejects_unknown_benchmark(tmp_path: Path, data: Path, capsys) -> None:
    path = _config(tmp_path, data, [{"name": "x", "path": "tiny:llava"}])
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--benchmarks", '[{"name": "nope", "file": "f"}]'])
    assert "--benchmarks[0]: unknown benchmark name" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path", sorted((REPO / "configs").glob("eval_*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_parse(path: Path) -> None:
    assert (
        path.read_text().splitlines()[0] == f"# vpa eval --config configs/{path.name}"
    )
    opts = parse_config(["--config", str(path)])
    assert opts["models"] and all(isinstance(m, ModelSpec) for m in opts["models"])
    for m in opts["models"]:
        m.check()
    from vpa_lightning.eval.benchmarks import build_benchmark

    assert all(
        build_benchmark(b).name in ("pope", "mme", "mmbench", "mvbench", "mmvet", "llava_bench", "mmhal")
        for b in opts["benchmarks"]
    )


def test_shipped_configs_exist() -> None:
    assert {p.name for p in (REPO / "configs").glob("eval_*.yaml")} >= {
        "eval_pope.yaml",
        "eval_mme.yaml",
        "eval_mmbench.yaml",
    }


def test_cli_module_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, vpa_lightning.eval.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
