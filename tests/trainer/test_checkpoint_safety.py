"""Checkpoints are loaded with ``weights_only=True`` explicitly (issue 13): a crafted ``.ckpt`` whose
pickle calls a function is refused by ``vpa export``/``eval`` (``load_module``) and by ``vpa
validate --ckpt_path``, even where torch's default is to unpickle anything (torch < 2.6, or
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which only applies when the caller does not say)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_checkpoint(tmp_path, monkeypatch) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": {},
            "pytorch-lightning_version": "2.6.0",
            "hyper_parameters": {"model_name_or_path": "tiny:llava"},
            "payload": _RunsCode(marker),
        },
        path,
    )
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default as it was before 2.6
    with pytest.warns(UserWarning, match="weights_only=False"):  # the setting really unlocks a default load
        torch.load(path, map_location="cpu")
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_load_module_refuses_a_checkpoint_that_runs_code(evil_checkpoint):
    from vpa_lightning.export import load_module

    path, marker = evil_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        load_module(path)
    assert not marker.exists()


def test_cli_ckpt_path_refuses_a_checkpoint_that_runs_code(evil_checkpoint, demo_shards, tmp_path):
    from vpa_lightning.cli import cli_main

    path, marker = evil_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        cli_main(
            [
                "validate",
                "--model.model_name_or_path", "tiny:llava",
                "--data.train_shards", str(demo_shards),
                "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false",
                "--ckpt_path", str(path),
            ]
        )
    assert not marker.exists()
