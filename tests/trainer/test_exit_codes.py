"""Exit statuses of the installed ``vpa`` console script: 0 on success, 2 for a bad flag or value
(named in the message), 1 for a run that fails. Subprocesses run the real entry point; the other
subcommands run :func:`vpa_lightning.cli.console_main` in-process (the function the script calls)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import console_script
from vpa_lightning.cli import console_main
from vpa_lightning.errors import TooManySkippedError, UsageError


def _vpa(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("vpa"), *args], capture_output=True, text=True, timeout=timeout)


def _fit_args(shards: Path, root: Path) -> list[str]:
    return [
        "--model.model_name_or_path", "tiny:llava",
        "--data.train_shards", str(shards),
        "--data.batch_size", "2",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
    ]


@pytest.fixture(scope="module")
def fitted(demo_shards, tmp_path_factory) -> tuple[Path, Path]:
    """``vpa fit`` (2 steps) through the console script: exit status 0 (was 1: the CLI object went to sys.exit)."""
    root = tmp_path_factory.mktemp("fit")
    proc = _vpa("fit", *_fit_args(demo_shards, root), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = root.glob("**/checkpoints/*.ckpt")
    return root, ckpt


def test_fit_exits_zero(fitted):
    root, ckpt = fitted
    assert ckpt.stat().st_size > 0 and list(root.glob("**/events.out.tfevents.*"))


def test_fit_bad_flag_and_bad_value_exit_2(demo_shards, tmp_path):
    proc = _vpa("fit", *_fit_args(demo_shards, tmp_path), "--model.no_such_option", "1")
    assert proc.returncode == 2 and "no_such_option" in proc.stderr
    proc = _vpa("fit", *_fit_args(demo_shards, tmp_path), "--model.warmup_ratio", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "vpa fit: error:" in proc.stderr and "warmup_ratio" in proc.stderr and "Traceback" not in proc.stderr


def test_fit_before_the_demo_data_exists_names_the_path_and_the_command(tmp_path):
    """``vpa fit --config configs/demo.yaml`` with no shards built: one error naming the path and how to build it."""
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    missing = tmp_path / "vpa-demo" / "shards"
    proc = _vpa("fit", "--config", str(config), "--data.train_shards", str(missing), "--trainer.default_root_dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(error) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--data.train_shards" in error[0] and str(missing) in error[0]
    assert f"vpa-shard demo {missing.parent}" in error[0] and "vpa demo" in error[0]
    assert "schedule" not in proc.stderr and "max_steps" not in error[0]


@pytest.mark.parametrize(
    "args, status, named",
    [
        (["report", "/nonexistent/run"], 2, "/nonexistent/run"),
        (["export", "/nonexistent/x.ckpt", "/tmp/never-written"], 1, "x.ckpt"),
        (["export"], 2, "checkpoint"),
        (["eval", "--no_such_option", "1"], 2, "no_such_option"),
        (["seva", "generate", "--no_such_option", "1"], 2, "no_such_option"),
        (["demo", "--num-images", "0"], 2, "--num-images"),
        (["demo", "--help"], 0, "--out"),
        ([], 2, "commands:"),
    ],
)
def test_tool_exit_statuses(args, status, named):
    proc = _vpa(*args)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert named in proc.stdout + proc.stderr


def test_vpa_help_lists_every_command():
    """`vpa --help` names every command, the LightningCLI ones and the tools, each of which has its own --help."""
    from vpa_lightning.cli import COMMANDS, TOOLS

    proc = _vpa("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS) == {"fit", "validate", "test", "predict", *TOOLS}


def test_validate_test_predict_export_report_exit_zero(fitted, demo_shards, tmp_path):
    root, ckpt = fitted
    common = [*_fit_args(demo_shards, tmp_path), "--ckpt_path", str(ckpt)]
    assert console_main(["validate", *common, "--trainer.limit_val_batches", "1"]) == 0
    assert console_main(["test", *common, "--trainer.limit_test_batches", "1"]) == 0
    assert console_main(["predict", *common, "--trainer.limit_predict_batches", "1"]) == 0
    assert console_main(["export", str(ckpt), str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "adapter").is_dir()
    assert console_main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()
    with pytest.raises(FileNotFoundError):  # a runtime failure: traceback, exit status 1 from the script
        console_main(["validate", *common, "--ckpt_path", str(tmp_path / "missing.ckpt")])


def test_console_main_maps_errors(monkeypatch, capsys):
    import vpa_lightning.cli as cli

    def raising(exc):
        def run(args):
            raise exc
        return run

    for exc, status in [(UsageError("--data.x: bad"), 2), (TooManySkippedError("too many"), 1), (SystemExit(None), 0), (SystemExit(2), 2)]:
        monkeypatch.setattr(cli, "main", raising(exc))
        assert cli.console_main(["fit"]) == status
    assert "vpa fit: error: --data.x: bad" in capsys.readouterr().err
    monkeypatch.setattr(cli, "main", raising(RuntimeError("bug")))
    with pytest.raises(RuntimeError):  # unexpected errors keep their traceback (status 1 from Python)
        cli.console_main(["fit"])
