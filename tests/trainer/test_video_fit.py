"""``vpa fit`` on video shards (issue 25): a tiny Qwen2-VL (and a tiny LLaVA-NeXT-Video) trains a few steps on CPU through the CLI (packed
shared-prefix groups, no fallback to the plain path) to a finite loss; a model without video input stops at
start-up, naming the families that take video."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("torchvision")

from vpa_lightning.cli import cli_main  # noqa: E402
from vpa_lightning.errors import VideoUnsupportedError  # noqa: E402

from ..videos import encode_frames, encode_video, key, moving_frames, video_sample, write_shard  # noqa: E402

ANSWERS = [("A red square moves to the right.", "Nothing moves."), ("The bar moves down.", "A cat sleeps."),
           ("Two shapes move.", "It is a photo.")]


def _shard(tmp_path: Path, n: int = 6) -> Path:
    samples = []
    for i in range(n):
        frames = moving_frames(8, (56, 56), seed=i)
        good, bad = ANSWERS[i % len(ANSWERS)]
        if i % 2:
            videos = [("frames", encode_frames(frames[::2]))]
        else:
            videos = [("file", encode_video(frames, fps=4))]
        samples.append(video_sample(key(i), "What happens in this clip? ", [good, bad, "Blue."], videos, [27]))
    return write_shard(tmp_path / "shards" / "train-000000.tar", samples)


def _fit(shard: Path, tmp_path: Path, model: str, *extra: str):
    return cli_main([
        "fit",
        "--model.model_name_or_path", model,
        "--data.train_shards", str(shard),
        "--data.batch_size", "2",
        "--data.shuffle_buffer", "0",
        "--data.video_fps", "2",
        "--data.video_max_frames", "4",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        *extra,
    ])


@pytest.mark.parametrize("model", ["tiny:qwen2_vl", "tiny:llava_next_video"])
def test_fit_on_video_shards_reaches_a_finite_loss(tmp_path, model, no_pack_fallback):
    shard = _shard(tmp_path)
    cli = _fit(shard, tmp_path, model)
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert cli.datamodule.skipped == {}


def test_fit_of_a_model_without_video_stops_at_start_up(tmp_path):
    shard = _shard(tmp_path, n=2)
    with pytest.raises(VideoUnsupportedError, match="qwen2_vl, qwen2_5_vl"):
        _fit(shard, tmp_path, "tiny:llava")


def test_help_documents_the_video_flags(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in ("--data.video_fps", "--data.video_max_frames", "--data.video_max_pixels"):
        assert flag in out
    assert "PyAV" in out and "evenly spaced" in out


@pytest.mark.parametrize("as_frames", [False, True], ids=["mp4", "frame-folders"])
def test_fit_on_shards_the_rust_core_built_from_published_video_rows(tmp_path, as_frames, no_pack_fallback):
    """The two halves meet: ms-swift rows with mp4 files, or LLaVA-Hound-style frame folders, built by `vpa-shard
    build`, train through `vpa fit` with every sample used (none skipped as malformed)."""
    from vpa_lightning.data import build
    from vpa_lightning.data.demo_video import make_video_demo

    rows = make_video_demo(tmp_path / "data", num_clips=6, frames=6, size=56, fps=4, as_frames=as_frames)
    manifest = build([str(rows)], str(tmp_path / "shards"), val_fraction=0.0, seed=0)
    assert manifest["counts"]["videos"] == 6 and manifest["counts"]["records_rejected"] == 0
    members = {m for tar in (tmp_path / "shards").glob("train-*.tar") for m in tarfile.open(tar).getnames()}
    assert any(m.endswith(".v0.f0000.png") for m in members) == as_frames
    assert any(m.endswith(".v0.mp4") for m in members) == (not as_frames)
    cli = _fit(tmp_path / "shards", tmp_path, "tiny:qwen2_vl")
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert cli.datamodule.skipped == {}


def test_mdpo_trains_on_video_groups_with_the_clip_corrupted(tmp_path, no_pack_fallback):
    """mDPO's image-conditional term on a video-only group: the chosen rows' clips are corrupted (every frame of a
    clip alike, as SeVa's) and the fit trains to a finite loss without skipping a sample."""
    import torch

    from vpa_lightning.models.logps import select_rows

    shard = _shard(tmp_path)
    cli = _fit(shard, tmp_path, "tiny:qwen2_vl", "--model.loss", "vpa_lightning.losses.MDPOLoss")
    assert cli.trainer.global_step == 3 and cli.datamodule.skipped == {}
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    batch = next(iter(cli.datamodule.train_dataloader()))
    inputs = batch["inputs"]
    assert "pixel_values_videos" in inputs.model_inputs and inputs.model_inputs.get("pixel_values") is None
    torch.manual_seed(0)
    sub, index = cli.model.corrupted_chosen_batch(inputs, batch["chosen"])
    clean = select_rows(inputs, torch.unique(batch["chosen"])).model_inputs["pixel_values_videos"]
    corrupted = sub.model_inputs["pixel_values_videos"]
    assert corrupted.shape == clean.shape and not torch.equal(corrupted, clean)
    assert torch.equal(sub.model_inputs["video_grid_thw"], select_rows(inputs, torch.unique(batch["chosen"])).model_inputs["video_grid_thw"])


@pytest.mark.parametrize("model", ["tiny:llava_onevision", "tiny:llava_next_video"])
def test_one_tensor_families_get_one_frame_count_from_clips_of_any_length(tmp_path, model, no_pack_fallback):
    """LLaVA-OneVision and LLaVA-NeXT-Video take a batch's videos as one tensor: every clip is sampled to exactly
    --data.video_max_frames frames (a 2-frame clip repeats its frames, a 12-frame one is thinned), so batches that
    mix clip lengths train whole instead of skipping the groups whose count differs."""
    samples = []
    for i, n in enumerate([2, 12, 3, 9, 5, 12]):
        frames = moving_frames(n, (56, 56), seed=i)
        good, bad = ANSWERS[i % len(ANSWERS)]
        videos = [("frames", encode_frames(frames))] if i % 2 else [("file", encode_video(frames, fps=4))]
        samples.append(video_sample(key(i), "What happens in this clip? ", [good, bad, "Blue."], videos, [27]))
    shard = write_shard(tmp_path / "shards" / "train-000000.tar", samples)
    cli = _fit(shard, tmp_path, model)
    assert cli.trainer.global_step == 3 and cli.datamodule.skipped == {}
    assert cli.datamodule.video_sampling.exact_frames
    shapes = {tuple(b["inputs"].model_inputs["pixel_values_videos"].shape[:2]) for b in cli.datamodule.train_dataloader()}
    assert {frames for _, frames in shapes} == {4}, shapes


def test_other_families_keep_sampling_by_rate(tmp_path):
    """Qwen2-VL takes each video's own frame count (its temporal positions come from the sampled rate)."""
    cli = _fit(_shard(tmp_path, n=2), tmp_path, "tiny:qwen2_vl", "--trainer.max_steps", "1")
    assert not cli.datamodule.video_sampling.exact_frames
