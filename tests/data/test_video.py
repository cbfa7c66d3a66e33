"""Videos in the shards, read by the trainer: decoding with PyAV (files) and Pillow (frame lists) in the data workers,
sampling by ``--data.video_fps`` / ``--data.video_max_frames`` / ``--data.video_max_pixels``, shards in the sample
schema read by the data module into Qwen2-VL batches with the video where the prompt had it, corrupt / truncated /
zero-frame videos skipped and counted under a hard timeout, samples without videos read as before, and a family
without video input stopped at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lightning")
pytest.importorskip("webdataset")

from vpa_lightning.data.samples import SampleError, decode_sample  # noqa: E402
from vpa_lightning.data.video import VideoSampling, decode_video_file, decode_video_frames, sample_indices  # noqa: E402
from vpa_lightning.errors import UsageError, VideoUnsupportedError  # noqa: E402

from ..conftest import hard_timeout  # noqa: E402
from ..videos import empty_video, encode_frames, encode_video, key, moving_frames, video_sample, write_shard  # noqa: E402


def _png(colour=(200, 30, 30), size=(40, 40)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_sample_indices_by_fps_and_max_frames() -> None:
    assert sample_indices(40, 20.0, 2.0, 16) == [0, 10, 20, 30]  # 2 s at 20 fps, 2 per second
    assert sample_indices(40, 20.0, 2.0, 3) == [0, 13, 26]  # fewer allowed: evenly spaced over the whole video
    assert sample_indices(5, 30.0, 2.0, 16) == [0]  # shorter than one sampling period: one frame
    assert sample_indices(10, None, 2.0, 4) == [0, 2, 5, 7]  # no source rate: max_frames only
    assert sample_indices(6, 4.0, None, None) == list(range(6))
    assert sample_indices(0, 4.0, 2.0, 4) == []


def test_exact_frames_sample_one_count_whatever_the_length() -> None:
    """``exact_frames`` (the one-tensor families): exactly ``max_frames`` evenly spaced, repeated in a short clip."""
    assert sample_indices(100, 30.0, 2.0, 4, exact=True) == [0, 25, 50, 75]  # the rate is not used
    assert sample_indices(3, 30.0, 2.0, 8, exact=True) == [0, 0, 0, 1, 1, 1, 2, 2]
    short = encode_video(moving_frames(3, (32, 32), seed=2), fps=4)
    clip = decode_video_file(short, "v0.mp4", VideoSampling(max_frames=8, exact_frames=True))
    assert clip.frames.shape[0] == 8 and clip.indices == [0, 0, 0, 1, 1, 1, 2, 2]
    assert np.array_equal(clip.frames[0], clip.frames[2]) and not np.array_equal(clip.frames[0], clip.frames[7])
    listed = decode_video_frames(encode_frames(moving_frames(2, (32, 32))), ["f0.jpg", "f1.jpg"],
                                 VideoSampling(max_frames=4, exact_frames=True))
    assert listed.frames.shape[0] == 4 and listed.indices == [0, 0, 1, 1]


def test_a_video_file_decodes_to_its_sampled_frames() -> None:
    frames = moving_frames(10, (32, 32), seed=1)
    data = encode_video(frames, fps=4)
    clip = decode_video_file(data, "v0.mp4", VideoSampling(fps=2.0, max_frames=16))
    assert clip.frames.shape == (5, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.indices == [0, 2, 4, 6, 8] and clip.fps == 4.0 and clip.total_frames == 10 and clip.sampled_fps == 2.0
    # the decoded pixels are the encoded ones (H.264 at its default quality: a few levels off)
    assert np.abs(clip.frames.astype(int) - frames[clip.indices].astype(int)).mean() < 12
    few = decode_video_file(data, "v0.mp4", VideoSampling(fps=None, max_frames=3))
    assert few.indices == [0, 3, 6]
    small = decode_video_file(data, "v0.mp4", VideoSampling(fps=4.0, max_frames=None, max_pixels=256))
    assert small.frames.shape == (10, 16, 16, 3)  # scaled down to the pixel limit as decoded
    meta = small.metadata()
    assert meta.total_num_frames == 10 and meta.fps == 4.0 and meta.frames_indices == list(range(10))
    # other containers and codecs, sniffed from the bytes
    mkv = decode_video_file(encode_video(frames, fps=4, fmt="matroska", codec="mpeg4"), "v0.mkv", VideoSampling())
    assert mkv.indices == [0, 2, 4, 6, 8]


def test_a_frame_list_decodes_its_sampled_frames_only() -> None:
    frames = moving_frames(10, (32, 24), seed=2)
    jpegs = encode_frames(frames)
    names = [f"v0.f{i:04d}.jpg" for i in range(10)]
    clip = decode_video_frames(jpegs, names, VideoSampling(fps=2.0, max_frames=4))
    assert clip.frames.shape == (4, 24, 32, 3) and clip.indices == [0, 2, 5, 7]
    assert np.abs(clip.frames.astype(int) - frames[clip.indices].astype(int)).mean() < 8
    jpegs[1] = b"not a jpeg"  # never decoded: not sampled
    assert decode_video_frames(jpegs, names, VideoSampling(fps=2.0, max_frames=4)).indices == [0, 2, 5, 7]
    # a frame list with its own rate is sampled at --data.video_fps
    at_8 = decode_video_frames(encode_frames(frames), names, VideoSampling(fps=2.0, max_frames=16), fps=8.0)
    assert at_8.indices == [0, 5] and at_8.fps == 8.0  # 1.25 s at 8 fps, 2 per second
    with pytest.raises(SampleError, match="cannot decode image v0.f0000.jpg"):
        decode_video_frames([b"broken"] + jpegs[1:], names, VideoSampling())


BAD_VIDEOS = {
    "truncated": lambda: encode_video(moving_frames(10))[:700],
    "garbage": lambda: bytes(range(256)) * 8,
    "zero_frames": empty_video,
    "empty_file": lambda: b"",
}


@pytest.mark.parametrize("name", sorted(BAD_VIDEOS))
def test_an_undecodable_video_raises_a_sample_error(name) -> None:
    with hard_timeout(60), pytest.raises(SampleError, match="video v0.mp4"):
        decode_video_file(BAD_VIDEOS[name](), "v0.mp4", VideoSampling())


def test_a_frame_over_the_pixel_limit_is_refused_from_the_header() -> None:
    data = encode_video(moving_frames(4, (64, 48)))
    with pytest.raises(SampleError, match="over the limit of 1000"):
        decode_video_file(data, "v0.mp4", VideoSampling(max_image_pixels=1000))


def _video_shard(tmp_path: Path, bad: bool = False) -> tuple[Path, dict]:
    """One shard: a video file, a frame list, a video with an image, an image-only and a text-only sample (no
    ``videos`` key, as shards built before videos); with ``bad`` also a sample per undecodable video."""
    mp4 = encode_video(moving_frames(8, (56, 56), seed=0), fps=4)
    samples = [
        video_sample(key(0), "What moves in this clip? ", ["A red square moves right.", "Nothing.", "A bar."],
                     [("file", mp4)], [25]),
        video_sample(key(1), "Describe  briefly.", ["Shapes move.", "A cat sleeps."],
                     [("frames", encode_frames(moving_frames(6, (56, 56), seed=1)))], [9]),
        video_sample(key(2), "Compare  with .", ["They match.", "They differ."], [("file", mp4)], [14],
                     images=[(_png(), 8)]),
    ]
    for i, (prompt, videos) in enumerate([("An image.", None), ("No picture here.", None)]):
        sample = video_sample(key(3 + i), prompt, ["Yes.", "No."], [], images=[(_png((20, 90, 200)), 0)] if i == 0 else [])
        meta = json.loads(sample["json"])
        del meta["videos"]
        sample["json"] = json.dumps(meta).encode()
        samples.append(sample)
    if bad:  # first: a skipped sample's reason travels with the next batch
        bad_samples = [video_sample(key(10 + i), f"Bad video {name}.", ["a", "b"], [("file", BAD_VIDEOS[name]())])
                       for i, name in enumerate(sorted(BAD_VIDEOS))]
        missing = video_sample(key(20), "Missing member.", ["a", "b"], [("file", mp4)])
        del missing["v0.mp4"]
        samples = [*bad_samples, missing, *samples]
    return write_shard(tmp_path / "train-000000.tar", samples), {"mp4": mp4}


@pytest.fixture(scope="module")
def qwen2_vl():
    pytest.importorskip("torchvision")
    from vpa_lightning.models import build_tiny_vlm

    return build_tiny_vlm("qwen2_vl")


def test_video_shards_become_batches_with_the_video_where_the_prompt_had_it(tmp_path, qwen2_vl) -> None:
    from vpa_lightning import PreferenceDataModule

    _, processor = qwen2_vl
    shard, _ = _video_shard(tmp_path)
    dm = PreferenceDataModule(str(shard), test_shards=str(shard), batch_size=5, processor=processor, max_length=None,
                              video_fps=2.0, video_max_frames=4)
    batches = list(dm.test_dataloader())
    assert len(batches) == 1 and dm.skipped == {}
    batch = batches[0]
    assert batch["keys"] == [key(i) for i in range(5)]
    inputs = batch["inputs"]
    assert inputs.video_counts.tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    # file: 8 frames at 4 fps, 2 per second -> 4 frames -> 2 temporal patches x 4 x 4; frames: 6 (taken as at 2 fps) -> 4
    assert inputs.model_inputs["video_grid_thw"].tolist() == [[2, 4, 4]] * 7
    assert inputs.model_inputs["pixel_values_videos"].shape[0] == 7 * 32 and inputs.video_pixel_rows.tolist()[:7] == [32] * 7
    assert inputs.image_counts.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    tokenizer = processor.tokenizer
    text = tokenizer.decode(inputs.model_inputs["input_ids"][0][: int(inputs.prompt_lengths[0])])
    assert "What moves in this clip? <|vision_start|>" + "<|video_pad|>" * 8 + "<|vision_end|><|end|>" in text
    text = tokenizer.decode(inputs.model_inputs["input_ids"][5][: int(inputs.prompt_lengths[5])])
    assert "Compare <|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|> with <|vision_start|><|video_pad|>" in text
    text = tokenizer.decode(inputs.model_inputs["input_ids"][3][: int(inputs.prompt_lengths[3])])
    assert "Describe <|vision_start|><|video_pad|>" in text and "<|vision_end|> briefly." in text
    # the batch trains: finite log-probs for every row
    from vpa_lightning.models import group_logps

    model, _ = qwen2_vl
    with torch.no_grad():
        assert torch.isfinite(group_logps(model, inputs, pack=True).sum_logps).all()


def test_bad_videos_are_skipped_and_counted_without_hanging(tmp_path, qwen2_vl, caplog) -> None:
    from vpa_lightning import PreferenceDataModule

    _, processor = qwen2_vl
    shard, _ = _video_shard(tmp_path, bad=True)
    dm = PreferenceDataModule(str(shard), test_shards=str(shard), batch_size=4, processor=processor, max_length=None)
    with hard_timeout(300):
        batches = list(dm.test_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [key(i) for i in range(5)]
    assert dm.skipped == {"malformed_sample": len(BAD_VIDEOS) + 1}
    reasons = [r for b in batches for r in b["skipped"]]
    assert len(reasons) == len(BAD_VIDEOS) + 1
    assert any("has no frames" in r for r in reasons) and any("cannot decode video v0.mp4" in r for r in reasons)
    assert any("not in the shard" in r for r in reasons)


def test_a_prompt_whose_video_leaves_no_room_is_skipped_with_its_reason(tmp_path, qwen2_vl) -> None:
    """Video tokens are never truncated: a sample whose prompt with its video does not fit max_length is skipped
    (``tokenisation``), the others train."""
    from vpa_lightning import PreferenceDataModule

    _, processor = qwen2_vl
    shard, _ = _video_shard(tmp_path)
    lengths = next(iter(PreferenceDataModule(str(shard), test_shards=str(shard), batch_size=5, processor=processor,
                                             max_length=None).test_dataloader()))["inputs"].prompt_lengths.tolist()
    assert lengths[9] < lengths[0]  # the text-only prompt is shorter than the first video's
    dm = PreferenceDataModule(str(shard), test_shards=str(shard), batch_size=5, processor=processor, max_length=lengths[0])
    batches = list(dm.test_dataloader())
    kept = [k for b in batches for k in b["keys"]]
    assert key(3) in kept and key(4) in kept and key(0) not in kept
    assert dm.skipped.get("tokenisation", 0) >= 1
    reasons = " ".join(r for b in batches for r in b["skipped"])
    assert "image and video tokens included" in reasons


def test_samples_without_videos_decode_as_before() -> None:
    """``videos: []`` and no ``videos`` key give the same example as an image-only shard always did."""
    base = video_sample(key(1), "What is it?", ["A square.", "A cat."], [], images=[(_png(), 0)])
    meta = json.loads(base["json"])
    without = dict(base, json=json.dumps({k: v for k, v in meta.items() if k != "videos"}).encode())
    for sample in (base, without):
        example = decode_sample(sample)
        assert example.group.videos is None and example.videos == [] and example.group.video_offsets is None
        assert example.group.image_offsets == [0] and len(example.images) == 1


@pytest.mark.parametrize(("entry", "error"), [
    ({"kind": "stream", "members": ["v0.mp4"]}, "kind 'stream'"),
    ({"kind": "file", "members": []}, "lists no members"),
    ({"kind": "file", "members": ["v0.mp4", "v1.mp4"]}, "lists 2 members"),
    ({"kind": "frames", "members": ["v0.mp4"]}, "not one of the image types"),
    ({"kind": "file", "members": ["v0.mp4"], "offset": 99}, "video offsets"),
    ({"kind": "file", "members": ["v0.mp4"], "fps": -1}, "fps -1"),
])
def test_malformed_video_entries_are_sample_errors(entry, error) -> None:
    sample = video_sample(key(1), "What?", ["a", "b"], [("file", encode_video(moving_frames(2)))])
    meta = json.loads(sample["json"])
    meta["videos"] = [entry]
    sample["json"] = json.dumps(meta).encode()
    with pytest.raises(SampleError, match=error):
        decode_sample(sample)


def test_video_flags_are_checked_by_name() -> None:
    from vpa_lightning import PreferenceDataModule

    for kwargs, flag in [({"video_fps": 0}, "--data.video_fps"), ({"video_max_frames": 0}, "--data.video_max_frames"),
                         ({"video_fps": None, "video_max_frames": None}, "--data.video_fps and --data.video_max_frames"),
                         ({"video_max_pixels": 0}, "--data.video_max_pixels")]:
        with pytest.raises(UsageError, match=flag):
            PreferenceDataModule("x.tar", **kwargs)


def test_the_processor_gets_the_pixel_limit(tmp_path, qwen2_vl) -> None:
    from vpa_lightning import PreferenceDataModule

    _, processor = qwen2_vl
    shard, _ = _video_shard(tmp_path)
    dm = PreferenceDataModule(str(shard), test_shards=str(shard), batch_size=1, processor=processor,
                              video_max_pixels=28 * 28, video_max_frames=2)
    batch = next(iter(dm.test_dataloader()))
    assert batch["inputs"].model_inputs["video_grid_thw"].tolist()[0] == [1, 2, 2]  # 28 x 28: one merged patch


def test_a_family_without_video_stops_at_start_up(tmp_path) -> None:
    """LLaVA on shards whose first training sample has a video: setup fails, naming the families that take
    video (not a run that skips every video sample, nor one that trains them as text)."""
    from vpa_lightning import PreferenceDataModule
    from vpa_lightning.data.collate import GroupCollator
    from vpa_lightning.models import build_tiny_vlm

    _, processor = build_tiny_vlm("llava")
    shard, _ = _video_shard(tmp_path)
    dm = PreferenceDataModule(str(shard), batch_size=2, processor=processor)
    with pytest.raises(VideoUnsupportedError, match="qwen2_vl, qwen2_5_vl"):
        dm.setup("fit")
    # a later sample with a video stops the run at its batch, never a skip
    with pytest.raises(VideoUnsupportedError, match="has a video"):
        GroupCollator(processor)([decode_sample(next(iter(_raw(shard))))])


def _raw(shard: Path):
    import webdataset as wds

    return wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())
