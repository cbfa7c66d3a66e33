"""Fixtures for trainer tests: small demo shards (several train shards) and the tiny LLaVA processor."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("lightning")
pytest.importorskip("peft")
pytest.importorskip("webdataset")


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """``vpa-shard demo``-style build: 40 images, val 20 %, at most 16 groups per shard (so several train shards)."""
    from vpa_lightning.data import build
    from vpa_lightning.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo")
    ann = make_demo(root / "data", num_images=40, seed=0)
    build([str(ann)], root / "shards", val_fraction=0.2, max_samples_per_shard=16)
    return root / "shards"


@pytest.fixture(scope="session")
def manifest(demo_shards) -> dict:
    return json.loads((demo_shards / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_llava():
    from vpa_lightning.models import build_tiny_vlm

    return build_tiny_vlm("llava", seed=0)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
