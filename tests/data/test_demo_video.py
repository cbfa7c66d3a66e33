"""The demo world in motion: clips written as ms-swift rows, decodable, deterministic, and built so that the first
frame alone answers neither question (the motion and the last frame do)."""

from __future__ import annotations

import json

import numpy as np
import pytest

av = pytest.importorskip("av")


def _frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _shape(frame: np.ndarray) -> tuple[tuple[int, int], np.ndarray]:
    """The centre and mean colour of the saturated (shape) pixels."""
    sat = frame.max(axis=2).astype(int) - frame.min(axis=2)
    ys, xs = np.nonzero(sat > 80)
    return (int(xs.mean()), int(ys.mean())), frame[ys, xs].mean(axis=0)


def test_clips_need_more_than_the_first_frame(tmp_path) -> None:
    from vpa_lightning.data.demo import COLOURS
    from vpa_lightning.data.demo_video import DIRECTIONS, make_video_demo, video_answer_is_correct

    ann = make_video_demo(tmp_path / "v", num_clips=12, frames=8, size=32)
    rows = [json.loads(line) for line in ann.read_text().splitlines()]
    assert len(rows) == 12 and {r["truth"]["kind"] for r in rows} == {"direction", "last_colour"}
    for row in rows:
        frames = _frames(tmp_path / "v" / row["videos"][0])
        assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
        (x0, y0), first = _shape(frames[0])
        (x1, y1), last = _shape(frames[-1])
        assert abs(x0 - 16) <= 2 and abs(y0 - 16) <= 2  # every clip starts at the centre: frame 0 shows no direction
        truth = row["truth"]
        nearest = lambda rgb: min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - rgb).sum())  # noqa: E731
        assert nearest(first) == truth["first_colour"] and nearest(last) != truth["first_colour"]
        if truth["kind"] == "direction":
            moved = tuple(int(np.sign(d)) if abs(d) > 3 else 0 for d in (x1 - x0, y1 - y0))  # codec noise: a pixel
            assert moved == DIRECTIONS[truth["answer"]]
        else:
            assert nearest(last) == truth["answer"]
        question = row["messages"][0]["content"]
        assert question.startswith("<video>")
        assert video_answer_is_correct(question, row["messages"][1]["content"], row["messages"][1]["content"])
        assert not video_answer_is_correct(question, row["rejected_response"], row["messages"][1]["content"])
    assert ann.read_bytes() == make_video_demo(tmp_path / "again", num_clips=12).read_bytes()  # deterministic rows


def test_frame_folders(tmp_path) -> None:
    from vpa_lightning.data.demo_video import make_video_demo

    ann = make_video_demo(tmp_path / "f", num_clips=2, frames=5, as_frames=True)
    row = json.loads(ann.read_text().splitlines()[0])
    folder = tmp_path / "f" / row["videos"][0]
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{t:03d}.png" for t in range(5)]
    with pytest.raises(ValueError, match="frames"):
        make_video_demo(tmp_path / "x", num_clips=1, frames=1)
