"""``vpa demo``: the README's first set-up command builds the demo shards, trains and prints the
before/after table, through the installed console script (reduced size here)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import console_script

ROOT = Path(__file__).resolve().parents[2]


def test_vpa_demo_builds_trains_and_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [console_script("vpa"), "demo", "--out", str(out), "--num-images", "16", "--seed", "1", "--max-steps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["groups_val"] > 0 and manifest["config"]["seed"] == 1
    assert "vpa-shard summary" in proc.stdout
    table = proc.stdout[proc.stdout.index("Preference report"):]
    assert re.search(r"metric +\| +before +\| +after", table)
    accuracy = next(line for line in table.splitlines() if line.startswith("val/rewards/accuracies"))
    before, after = (float(x) for x in accuracy.split("|")[1:])
    assert before == 0.0 and after > 0.0  # the policy moved away from its reference
    assert list((out / "runs").glob("**/checkpoints/*.ckpt")) and list((out / "reference-cache").iterdir())
    # the newcomer's screen: nothing a user cannot act on, no progress bars' carriage returns in a log, and a line
    # per epoch instead
    screen = proc.stdout + proc.stderr
    for noise in ("\N{ELECTRIC LIGHT BULB}", "LightningCLI's args", "module(s) in eval mode", "FutureWarning", "LeafSpec",
                  "DeprecationWarning", "\r"):
        assert noise not in screen, f"{noise!r} on the demo's screen:\n{screen[-3000:]}"
    assert re.search(r"^epoch 1/10 +step \d+", proc.stdout, re.M)


def test_vpa_demo_on_a_terminal_shows_a_progress_bar(tmp_path):
    """On a terminal (a pseudo-terminal here) Lightning's progress bar shows; the per-epoch lines do not."""
    import os
    import pty
    import select
    import time

    out = tmp_path / "demo"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the demo with its stdout and stderr on the terminal
        os.execv(console_script("vpa"), ["vpa", "demo", "--out", str(out), "--num-images", "16", "--max-epochs", "1"])
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, screen[-3000:]
    assert re.search(r"Epoch 0\b", screen) and "it/s" in screen, screen[-3000:]  # Lightning's bar (tqdm or rich)
    assert not re.search(r"^epoch 1/1 +step", screen, re.M)


def test_packaged_demo_config_is_configs_demo_yaml():
    from vpa_lightning.demo import CONFIG

    assert CONFIG.read_bytes() == (ROOT / "configs" / "demo.yaml").read_bytes()


def test_packaged_video_demo_config_is_configs_demo_video_yaml():
    from vpa_lightning.demo import VIDEO_CONFIG

    assert VIDEO_CONFIG.read_bytes() == (ROOT / "configs" / "demo_video.yaml").read_bytes()


def _held_out_accuracy(stdout: str) -> float:
    table = stdout[stdout.index("Preference report"):]
    line = next(line for line in table.splitlines() if line.startswith("val/rewards/accuracies"))
    before, after = (float(x) for x in line.split("|")[1:])
    assert before == 0.0
    return after


def test_vpa_demo_video_learns_what_the_first_frame_cannot_show(tmp_path):
    """`vpa demo --video` (issue 25): ms-swift rows with mp4 clips -> the Rust build -> `vpa fit` of a tiny Qwen2-VL.
    The held-out pairs need the motion or the last frame, so the clip's 8 frames learn them and the first frame
    alone (`--data.video_max_frames 1`) stays near chance. Reduced size (the README states the default run)."""
    pytest.importorskip("av")
    pytest.importorskip("torchvision")
    accuracy = {}
    for frames in (8, 1):
        out = tmp_path / f"frames{frames}"
        proc = subprocess.run(
            [console_script("vpa"), "demo", "--video", "--out", str(out), "--num-clips", "320", "--max-epochs", "8",
             "--", f"--data.video_max_frames={frames}"],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = json.loads((out / "shards" / "manifest.json").read_text())
        assert manifest["counts"]["videos"] == 320 and manifest["counts"]["records_rejected"] == 0
        accuracy[frames] = _held_out_accuracy(proc.stdout)
    assert accuracy[8] >= 0.75, accuracy
    assert accuracy[1] <= 0.7 and accuracy[8] - accuracy[1] >= 0.15, accuracy


def test_vpa_demo_video_rejects_bad_flags():
    proc = subprocess.run([console_script("vpa"), "demo", "--video", "--num-clips", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--num-clips must be >= 1" in proc.stderr
    proc = subprocess.run([console_script("vpa"), "demo", "--video", "--rounds", "2"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--video and --rounds" in proc.stderr
