"""PreferenceDataModule against hostile or broken input (issue 13, trainer's reader): every bad
sample is skipped and counted, whatever it raises; every image type the data core writes is read;
missing, empty, all-bad or stale shards fail naming the path; image bombs are refused from their
header; a manifest never makes WebDataset run a command."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from vpa_lightning import PreferenceDataModule, rust_pairs
from vpa_lightning.data import ManifestError, build
from vpa_lightning.data.datamodule import IMAGE_EXTENSIONS
from vpa_lightning.errors import BadShardsError, MissingShardsError, NothingTrainedError

from tests.conftest import hard_timeout
from .conftest import read_tar, write_tar


def _samples(demo_shards: Path) -> list[tuple[str, dict, str, bytes]]:
    """(key, json, image extension, image bytes) of the demo's first train shard."""
    members = dict(read_tar(demo_shards / "train-000000.tar"))
    out = []
    for key in sorted({name.split(".", 1)[0] for name in members}):
        meta = json.loads(members[f"{key}.json"])
        ext, image = next((n.split(".", 1)[1], d) for n, d in members.items() if n.startswith(key + ".") and not n.endswith(".json"))
        out.append((key, meta, ext, image))
    return out


def _shard(path: Path, samples: list[tuple[str, bytes | dict, str, bytes]]) -> Path:
    members = []
    for key, meta, ext, image in samples:
        members.append((f"{key}.{ext}", image))
        members.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    return write_tar(path, members)


def _keys(dm: PreferenceDataModule) -> tuple[list[str], list[str]]:
    keys, reported = [], []
    for batch in dm.train_dataloader():
        keys += batch["keys"]
        reported += batch["skipped"]
    return keys, reported


# ------------------------------------------------------------------ 1. any bad sample is skipped
def test_samples_raising_any_exception_are_skipped_and_counted(demo_shards, tiny_llava, tmp_path, caplog):
    _, processor = tiny_llava
    samples = _samples(demo_shards)
    (k0, m0, e0, i0), (k1, m1, e1, i1), (k2, m2, e2, i2), (k3, m3, e3, i3), *good = samples
    inf_pair = json.dumps(m0).replace('"chosen": 0', '"chosen": Infinity', 1).encode()
    assert b"Infinity" in inf_pair
    nan_pair = json.dumps(m1).replace('"rejected": ', '"rejected": NaN, "x": ', 1).encode()
    deep = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json.loads
    fractional = dict(m3, pairs=[dict(m3["pairs"][0], chosen=0.5)])
    bad = [(k0, inf_pair, e0, i0), (k1, nan_pair, e1, i1), (k2, deep, e2, i2), (k3, fractional, e3, i3)]
    path = _shard(tmp_path / "bad.tar", bad + good)
    dm = PreferenceDataModule(str(path), batch_size=4, processor=processor, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="vpa_lightning.data.datamodule"), hard_timeout(120):
        keys, reported = _keys(dm)
    assert sorted(keys) == sorted(k for k, *_ in good)
    assert dm.skipped == {"malformed_sample": 4}
    assert len(reported) == 4
    for key in (k0, k1, k2, k3):
        assert any(key in r.getMessage() for r in caplog.records), key
    assert any("RecursionError" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ 2. image types agree
PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}


def test_every_image_type_the_data_core_writes_is_read(tiny_llava, tmp_path):
    """Build with the Rust core from one image of each type it accepts; the trainer reads them all."""
    _, processor = tiny_llava
    assert set(rust_pairs.IMAGE_EXTENSIONS) <= set(IMAGE_EXTENSIONS)
    rows = []
    for i, ext in enumerate(rust_pairs.IMAGE_EXTENSIONS):
        Image.new("RGB", (20 + i, 16), (40 * i, 200, 30)).save(tmp_path / f"img{i}.{ext}", format=PIL_FORMAT[ext])
        completions = [
            {"model": m, "response": f"{m} says {ext} {i}", "annotations": {"Helpfulness": {"Rating": r}}}
            for m, r in (("a", 5), ("b", 3), ("c", 1))
        ]
        rows.append({"id": str(i), "prompt": f"What is in image {i}?", "img_path": f"img{i}.{ext}",
                     "models": ["a", "b", "c"], "completions": completions})
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = build([str(tmp_path / "ann.jsonl")], tmp_path / "shards", val_fraction=0.0, aspects="Helpfulness=1")
    assert manifest["counts"]["groups"] == len(rust_pairs.IMAGE_EXTENSIONS)
    written = {name.rsplit(".", 1)[1] for name, _ in read_tar(tmp_path / "shards" / "train-000000.tar")}
    assert written - {"json"} == set(rust_pairs.IMAGE_EXTENSIONS)
    dm = PreferenceDataModule(str(tmp_path / "shards"), batch_size=2, processor=processor, shuffle_buffer=0)
    keys, _ = _keys(dm)
    assert len(keys) == len(rust_pairs.IMAGE_EXTENSIONS) and dm.skipped == {}


# ------------------------------------------------------------------ 3. nothing to train on fails
def test_missing_shard_fails_naming_the_path(demo_shards, tiny_llava, tmp_path):
    _, processor = tiny_llava
    missing = tmp_path / "nowhere" / "train-000000.tar"
    dm = PreferenceDataModule(f"{demo_shards / 'train-000000.tar'}::{missing}", processor=processor)
    with pytest.raises(MissingShardsError, match=str(missing)):
        dm.train_dataloader()


def test_shard_removed_after_the_build_fails_naming_it(demo_shards, tiny_llava, tmp_path):
    _, processor = tiny_llava
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    os.remove(out / "train-000001.tar")
    dm = PreferenceDataModule(str(out), processor=processor)
    with pytest.raises(MissingShardsError, match="train-000001.tar.*does not exist"):
        dm.train_dataloader()


def test_shard_vanishing_during_the_run_is_logged_with_its_path(demo_shards, tiny_llava, tmp_path, caplog):
    _, processor = tiny_llava
    gone = tmp_path / "gone.tar"
    dm = PreferenceDataModule(str(demo_shards / "train-000000.tar"), processor=processor)
    with caplog.at_level(logging.WARNING, logger="vpa_lightning.data.datamodule"):
        assert list(dm.dataset([str(gone)], train=False)) == []  # past the check: deleted after it
    assert dm.skipped == {"shard": 1}
    assert any(str(gone) in r.getMessage() and "FileNotFoundError" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["zero_bytes", "empty_archive"])
def test_only_empty_shards_fail(tiny_llava, tmp_path, kind):
    _, processor = tiny_llava
    path = tmp_path / "empty.tar"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    else:
        write_tar(path, [])
    dm = PreferenceDataModule(str(path), processor=processor)
    with pytest.raises(BadShardsError, match=f"every shard is empty.*{path}"):
        dm.train_dataloader()


def test_fifo_shard_is_refused_without_blocking(tiny_llava, tmp_path):
    _, processor = tiny_llava
    fifo = tmp_path / "fifo.tar"
    os.mkfifo(fifo)
    dm = PreferenceDataModule(str(fifo), processor=processor)
    with hard_timeout(30), pytest.raises(BadShardsError, match="not a regular file"):
        dm.train_dataloader()


def _fit(tmp_path: Path, shards: str, *extra: str) -> None:
    from vpa_lightning.cli import cli_main

    cli_main(
        [
            "fit",
            "--model.model_name_or_path", "tiny:llava",
            "--model.lora", "false",
            "--data.train_shards", shards,
            "--data.batch_size", "2",
            "--data.val_shards", shards,
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.accelerator", "cpu",
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.limit_val_batches", "0",
            *extra,
        ]
    )


@pytest.mark.parametrize("limits", [["--trainer.max_epochs", "2", "--trainer.max_steps", "50"], ["--trainer.max_steps", "3", "--trainer.max_epochs", "-1"]])
def test_fit_on_all_bad_shard_fails_loudly(demo_shards, tmp_path, limits):
    """Every sample malformed: the fit raises (it used to report success after 0 steps, or loop
    forever over empty epochs with max_steps) and writes no checkpoint."""
    samples = _samples(demo_shards)[:4]
    path = _shard(tmp_path / "allbad.tar", [(k, b"{not json", e, i) for k, _, e, i in samples])
    with hard_timeout(240), pytest.raises(NothingTrainedError, match=r"0 training steps.*allbad\.tar.*malformed_sample"):
        _fit(tmp_path, str(path), *limits)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_vpa_fit_on_all_bad_shard_exits_1_naming_it(demo_shards, tmp_path):
    import subprocess

    from tests.conftest import console_script

    samples = _samples(demo_shards)[:4]
    path = _shard(tmp_path / "allbad.tar", [(k, b"{not json", e, i) for k, _, e, i in samples])
    proc = subprocess.run(
        [console_script("vpa"), "fit", "--model.model_name_or_path", "tiny:llava", "--data.train_shards", str(path),
         "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "0 training steps" in proc.stderr and str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_resampled_all_bad_shard_fails_instead_of_spinning(demo_shards, tiny_llava, tmp_path, monkeypatch):
    from vpa_lightning.data import datamodule

    monkeypatch.setattr(datamodule, "_MAX_SKIPS_WITHOUT_EXAMPLE", 50)  # the data module reads it when it builds a stream
    _, processor = tiny_llava
    samples = _samples(demo_shards)[:4]
    path = _shard(tmp_path / "allbad.tar", [(k, b"[]", e, i) for k, _, e, i in samples])
    dm = PreferenceDataModule(str(path), processor=processor, groups_per_epoch=8, batch_size=2)
    with hard_timeout(60), pytest.raises(RuntimeError, match="none was usable"):
        next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------ 4. image bombs
def _data_core_default_pixel_limit() -> int:
    from vpa_lightning.data import build_options

    options = build_options(["x.jsonl"], "out")
    del options["max_image_pixels"]  # what the Rust core fills in itself
    return json.loads(rust_pairs.check_config(json.dumps(options)))["max_image_pixels"]


def test_image_over_the_pixel_limit_is_skipped_from_its_header(demo_shards, tiny_llava, tmp_path, caplog):
    _, processor = tiny_llava
    samples = _samples(demo_shards)
    buf = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buf, format="PNG")  # 169 Mpx in a few hundred KB
    bomb = buf.getvalue()
    assert len(bomb) < 1 << 20
    key, meta, ext, _ = samples[0]
    path = _shard(tmp_path / "bomb.tar", [(key, meta, ext, bomb), *samples[1:]])  # Pillow reads the PNG whatever the name
    dm = PreferenceDataModule(str(path), processor=processor, shuffle_buffer=0)
    assert dm.max_image_pixels == Image.MAX_IMAGE_PIXELS == _data_core_default_pixel_limit()  # one limit
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with caplog.at_level(logging.WARNING, logger="vpa_lightning.data.datamodule"):
        keys, _ = _keys(dm)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert key not in keys and len(keys) == len(samples) - 1
    assert dm.skipped == {"malformed_sample": 1}
    assert any("13000x13000" in r.getMessage() and "max_image_pixels" in r.getMessage() for r in caplog.records)
    assert grown_mb < 100 or sys.platform != "linux"  # decoding it would take 169 MB (mode 1) or more
    # the limit is configurable: a lower one refuses the demo images too
    small = PreferenceDataModule(str(path), processor=processor, shuffle_buffer=0, max_image_pixels=10)
    assert _keys(small)[0] == [] and small.skipped == {"malformed_sample": len(samples)}


# ------------------------------------------------------------------ 5. manifests: no commands, no stale shards
def _manifest_dir(demo_shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("name", ["pipe:touch {marker}", "pipe:touch {marker} #.tar", "http://127.0.0.1:9/x.tar", "/etc/passwd", "../train-000000.tar", "-"])
def test_manifest_paths_are_never_urls_or_pipes(demo_shards, tiny_llava, tmp_path, monkeypatch, name):
    _, processor = tiny_llava
    out, manifest = _manifest_dir(demo_shards, tmp_path)
    marker = tmp_path / "pwned"
    manifest["shards"][0]["path"] = name.format(marker=marker)
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(out)  # `--data.train_shards .`: the path joined to "." used to stay "pipe:..."
    with pytest.raises(ManifestError, match="manifest"):
        dm = PreferenceDataModule(".", processor=processor, shuffle_buffer=0)
        list(dm.train_dataloader())
    assert not marker.exists()


def test_pipe_typed_by_the_user_is_still_honoured(demo_shards, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(f"pipe:cat {demo_shards / 'train-000000.tar'}", processor=processor, shuffle_buffer=0)
    keys, _ = _keys(dm)
    assert len(keys) == len(_samples(demo_shards))


def test_stale_manifest_fails_before_training(demo_shards, tiny_llava, tmp_path):
    """Shards that are not the ones the manifest lists (a rebuild killed over a finished build)."""
    _, processor = tiny_llava
    out, _ = _manifest_dir(demo_shards, tmp_path)
    original = (out / "train-000000.tar").read_bytes()
    (out / "train-000000.tar").write_bytes(original + bytes(1024))  # another build's shard of the same name
    with pytest.raises(BadShardsError, match=r"train-000000\.tar is \d+ bytes, its manifest says"):
        PreferenceDataModule(str(out), processor=processor).train_dataloader()
    # same size, other bytes: only the hash check (on request) sees it
    flipped = bytearray(original)
    flipped[600] ^= 0xFF
    (out / "train-000000.tar").write_bytes(bytes(flipped))
    PreferenceDataModule(str(out), processor=processor).train_dataloader()
    with pytest.raises(BadShardsError, match=r"train-000000\.tar has sha256 [0-9a-f]+, its manifest says"):
        PreferenceDataModule(str(out), processor=processor, verify_shards="hash").train_dataloader()
    (out / "train-000000.tar").write_bytes(original)
    PreferenceDataModule(str(out), processor=processor, verify_shards="hash").train_dataloader()
