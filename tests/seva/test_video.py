"""SeVa on video prompts (tiny Qwen2-VL; LLaVA-NeXT-Video's and OneVision's ``[videos, frames]`` layout): every frame of a clip gets the same augmentation (same random parameters),
in raw frames and through the processor's ``pixel_values_videos``; ``vpa seva generate`` on a video prompt file
writes pairs and shards that keep the videos."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("kornia")
pytest.importorskip("torchvision")  # the Qwen2-VL processors need a video processor

from tests.videos import encode_frames, encode_video, moving_frames  # noqa: E402
from vpa_lightning.augment.pixels import (  # noqa: E402
    corrupt_clip,
    corrupt_pixel_values,
    patchify_qwen2_vl_video,
    unpatchify_qwen2_vl_video,
)
from vpa_lightning.models.generation import encode_for_generation  # noqa: E402
from vpa_lightning.models.video import VideoClip  # noqa: E402

#: Random crop + flip + colour jitter + rotation + noise: every kind of random parameter.
AUGMENTATION = ["random_resized_crop", {"name": "horizontal_flip", "p": 0.5}, "color_jitter", "rotation",
                {"name": "diffusion_noise", "step": 300}]


@pytest.fixture(scope="module")
def tiny_qwen():
    from vpa_lightning.models import build_tiny_vlm

    return build_tiny_vlm("qwen2_vl")


def _still_clip(n: int = 4) -> torch.Tensor:
    frame = torch.from_numpy(moving_frames(1, (56, 56), seed=3)[0]).permute(2, 0, 1).float() / 255
    return frame.unsqueeze(0).repeat(n, 1, 1, 1)


def test_every_frame_of_a_clip_gets_the_same_parameters() -> None:
    still = _still_clip(6)
    out = corrupt_clip(still, AUGMENTATION, seed=5)
    assert out.shape == still.shape and (out - still).abs().mean() > 0.05
    for frame in out[1:]:
        torch.testing.assert_close(frame, out[0], rtol=0, atol=0)  # identical frames stay identical
    # independent draws per frame (the image path's batching) would not: the test can fail
    from vpa_lightning.augment import corrupt_images

    batched = corrupt_images(still, AUGMENTATION, seed=5)
    assert (batched[1:] - batched[:1]).abs().amax() > 0.05
    other_seed = corrupt_clip(still, AUGMENTATION, seed=6)
    assert (other_seed - out).abs().mean() > 0.01
    moving = torch.from_numpy(moving_frames(6, (56, 56), seed=3)).permute(0, 3, 1, 2).float() / 255
    assert (corrupt_clip(moving, AUGMENTATION, seed=5) - out).abs().mean() > 0.001  # another clip, another result
    torch.testing.assert_close(corrupt_clip(still, AUGMENTATION, seed=5), out)  # reproducible


def test_qwen_video_patches_round_trip_and_are_corrupted_alike(tiny_qwen) -> None:
    _, processor = tiny_qwen
    frames = (_still_clip(4).permute(0, 2, 3, 1) * 255).round().byte().numpy()
    clips = [VideoClip(frames=frames, fps=2.0, total_frames=4, indices=[0, 1, 2, 3]),
             VideoClip(frames=moving_frames(4, (56, 56), seed=1), fps=2.0, total_frames=4, indices=[0, 1, 2, 3])]
    inputs = encode_for_generation(processor, [[], []], ["What moves?", "And here?"], videos=clips)
    geo = {k: int(getattr(processor.video_processor, k)) for k in ("patch_size", "merge_size", "temporal_patch_size")}
    gt, gh, gw = inputs["video_grid_thw"][0].tolist()
    first = inputs["pixel_values_videos"][: gt * gh * gw]
    unpacked = unpatchify_qwen2_vl_video(first, gt, gh, gw, **geo)
    assert unpacked.shape == (4, 3, 56, 56)
    assert torch.equal(patchify_qwen2_vl_video(unpacked, **geo), first)
    bad = corrupt_pixel_values(inputs, processor, AUGMENTATION, seed=0)
    assert torch.equal(bad["input_ids"], inputs["input_ids"]) and bad["pixel_values_videos"].shape == inputs["pixel_values_videos"].shape
    frames_bad = unpatchify_qwen2_vl_video(bad["pixel_values_videos"][: gt * gh * gw], gt, gh, gw, **geo)
    assert (frames_bad - unpacked).abs().mean() > 0.05
    for frame in frames_bad[1:]:
        torch.testing.assert_close(frame, frames_bad[0], rtol=0, atol=1e-6)
    assert torch.equal(corrupt_pixel_values(inputs, processor, AUGMENTATION, seed=0)["pixel_values_videos"],
                       bad["pixel_values_videos"])



@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_one_tensor_video_layout_is_corrupted_alike(family) -> None:
    """LLaVA-NeXT-Video and LLaVA-OneVision (``pixel_values_videos`` ``[videos, frames, C, H, W]``): each clip is
    corrupted with every frame alike, an image in the same batch too, the text untouched."""
    from vpa_lightning.models import build_tiny_vlm

    _, processor = build_tiny_vlm(family)
    frames = (_still_clip(4).permute(0, 2, 3, 1) * 255).round().byte().numpy()
    clips = [VideoClip(frames=frames, fps=2.0, total_frames=4, indices=[0, 1, 2, 3]),
             VideoClip(frames=moving_frames(4, (56, 56), seed=1), fps=2.0, total_frames=4, indices=[0, 1, 2, 3])]
    inputs = encode_for_generation(processor, [[], []], ["What moves?", "And here?"], videos=clips)
    pv = inputs["pixel_values_videos"]
    assert pv.dim() == 5 and pv.shape[:2] == (2, 4)
    bad = corrupt_pixel_values(inputs, processor, AUGMENTATION, seed=0)
    assert torch.equal(bad["input_ids"], inputs["input_ids"]) and bad["pixel_values_videos"].shape == pv.shape
    assert (bad["pixel_values_videos"] - pv).abs().mean() > 0.05
    for frame in bad["pixel_values_videos"][0, 1:]:  # the still clip stays still
        torch.testing.assert_close(frame, bad["pixel_values_videos"][0, 0], rtol=0, atol=1e-5)

def test_seva_generate_on_video_prompts_keeps_the_videos(tiny_qwen, tmp_path) -> None:
    from vpa_lightning.seva.cli import main

    root = tmp_path / "media"
    (root / "frames").mkdir(parents=True)
    for i in range(3):
        (root / f"clip{i}.mp4").write_bytes(encode_video(moving_frames(8, (32, 32), seed=i)))
    for j, data in enumerate(encode_frames(moving_frames(4, (32, 32), seed=5))):
        (root / "frames" / f"{j:03d}.jpg").write_bytes(data)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    rows = [{"video": f"clip{i}.mp4", "question": f"<video>\nWhat moves in clip {i}?"} for i in range(3)]
    rows.append({"videos": ["frames"], "question": "What moves in the frames?"})
    rows.append({"video": "broken.mp4", "question": "What is this?"})  # line 5
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tmp_path / "model"
    from vpa_lightning.models import build_tiny_vlm

    build_tiny_vlm("qwen2_vl", out_dir=model_dir)
    out = tmp_path / "out"
    counts = main(["generate", "--model", str(model_dir), "--prompts_file", str(prompts), "--image_root", str(root),
                   "--out_dir", str(out), "--max_new_tokens", "6", "--batch_size", "2", "--video_max_frames", "4",
                   "--augmentation", "diffusion_noise"])
    assert counts["generated"] == 4 and counts["rejected"] == 1
    (reject,) = counts["rejected_reasons"]
    assert reject["source"] == "line 5" and reject["video"] == "broken.mp4" and "broken.mp4" in reject["reason"]
    pairs = [json.loads(line) for line in (out / "pairs-rank0.jsonl").read_text().splitlines()]
    assert [p.get("video", p.get("videos")) for p in pairs] == ["clip0.mp4", "clip1.mp4", "clip2.mp4", ["frames"]]
    assert all("image" not in p and p["question"].startswith("What moves") for p in pairs)
    assert counts["prompts_in"] == counts["rejected"] + counts["rejected_by_build"] + counts["identical_dropped"] + counts["pairs_written"]
    assert counts["pairs_written"] >= 1
    metas, names = [], []
    for tar in sorted(Path(counts["shard_dir"]).glob("*.tar")):
        with tarfile.open(tar) as tf:
            names += tf.getnames()
            metas += [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(metas) == counts["pairs_written"]
    for meta in metas:  # every pair's shard sample holds its video
        (video,) = meta["videos"]
        assert all(f"{meta['key']}.{m}" in names for m in video["members"])
