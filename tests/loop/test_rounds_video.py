"""vpa rounds on video prompts (issue 25): one on-policy round of a tiny Qwen2-VL through the console script - the
policy answers clips (sampled with the video), a tiny Qwen2-VL judge rates the answers by its rating-token
probabilities with the frames in its input, the Rust build keeps the videos in the round's shards, the fit trains
on them and the held-out prompts are answered and rated with their videos - so no stage quietly drops a clip and
trains text-only pairs."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import console_script

pytest.importorskip("av")
pytest.importorskip("torchvision")


def _prompt_rows(annotations: Path) -> list[dict]:
    """The video demo's ms-swift rows as prompt rows for `vpa sample` (question, videos, the truth the judge reads)."""
    rows = []
    for line in annotations.read_text().splitlines():
        r = json.loads(line)
        rows.append({"id": r["id"], "prompt": r["messages"][0]["content"], "videos": r["videos"], "truth": r["truth"]})
    return rows


def test_a_video_round_keeps_the_clips_through_every_stage(tmp_path) -> None:
    from vpa_lightning.data.demo_video import make_video_demo

    annotations = make_video_demo(tmp_path / "world", num_clips=10, frames=4, size=56, fps=4)
    rows = _prompt_rows(annotations)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    fit = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": []},
        "model": {"model_name_or_path": "tiny:qwen2_vl", "lora": True, "lora_r": 4, "lora_alpha": 8, "learning_rate": 0.01,
                  "lora_dropout": 0.0},
        "data": {"train_shards": "set/per/round", "batch_size": 2, "max_length": 160, "video_fps": 4,
                 "video_max_frames": 4},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    out = tmp_path / "rounds"
    proc = subprocess.run(
        [console_script("vpa"), "rounds", "--model", "tiny:qwen2_vl", "--prompts", json.dumps([str(tmp_path / "prompts.jsonl")]),
         "--heldout_prompts", json.dumps([str(tmp_path / "heldout.jsonl")]), "--out_dir", str(out),
         "--fit_config", str(tmp_path / "fit.yaml"), "--judge", "hf", "--judge_model", "tiny:qwen2_vl", "--k", "3",
         "--max_new_tokens", "8",
         "--val_fraction", "0", "--image_root", str(annotations.parent), "--num_rounds", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r0,) = json.loads((out / "rounds.json").read_text())["rounds"]
    assert r0["completions"] == 3 * 8 and r0["pairs"] > 0 and r0["eval"]["heldout_reward"] is not None
    # every sampled row still names its clip, and the judged file keeps it for the build
    for stage, name, n in (("sample", "sampled.jsonl", 8), ("judge", "judged.jsonl", 8), ("eval", "answers.jsonl", 2)):
        judged = [json.loads(line) for line in (out / "round0" / stage / name).read_text().splitlines()]
        assert len(judged) == n and all(len(r["videos"]) == 1 for r in judged), stage
    # the round's shards: every sample carries its clip as a member, and the build counted them
    manifest = json.loads(next((out / "round0").rglob("manifest.json")).read_text())
    members = [m for tar in (out / "round0").rglob("train-*.tar") for m in tarfile.open(tar).getnames()]
    jsons = [m for m in members if m.endswith(".json")]
    assert jsons and len([m for m in members if m.endswith(".v0.mp4")]) == len(jsons) == manifest["counts"]["videos"]
