"""The demo world in motion: short clips whose answers need more than the first frame.

Each clip shows one shape of one colour sliding from near the centre to the left, right, top or bottom; in its last
frame the shape changes colour. Two questions: which way the shape moves, and what colour it has in the last frame.
Frame 0 alone tells neither (the start is the centre up to a pixel or two, and the colour changes only at the end),
so a model that sees only the first frame cannot learn them; one that sees the clip can. Each record is a preference
pair in ms-swift's layout (``messages`` with the user turn and the chosen answer, ``rejected_response``, ``videos``);
the rejected answer is another direction, or a colour that is neither the last frame's nor the first frame's, so a
model that sees only the first frame cannot tell the chosen answer from the rejected one (preference accuracy 0.5).
``truth`` holds the right word and the words of its kind (``vpa judge --judge rule --reference truth.answer
--choices-field truth.choices``). Clips are mp4 (H.264, written with PyAV) or, with ``as_frames``, folders of PNG
frames (the LLaVA-Hound layout).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from vpa_lightning._io import write_text_atomic
from vpa_lightning.data.demo import COLOURS

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QUESTIONS = {
    "direction": "Which way does the shape move?",
    "last_colour": "What colour is the shape in the last frame?",
}
_VOCABULARY = {"direction": tuple(DIRECTIONS), "last_colour": tuple(COLOURS)}

__all__ = ["DIRECTIONS", "VIDEO_QUESTIONS", "clip_frames", "make_video_demo", "video_answer_is_correct"]


def clip_frames(colour: str, last_colour: str, direction: str, *, frames: int = 8, size: int = 32,
                rng: random.Random | None = None) -> list:
    """The clip's frames (PIL images): the shape moves from the centre in ``direction``; the last frame is in
    ``last_colour``."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    r = max(3, size // 8)
    x0, y0 = size // 2 + rng.randint(-1, 1), size // 2 + rng.randint(-1, 1)
    dx, dy = DIRECTIONS[direction]
    step = (size // 2 - r - 1) / max(1, frames - 1)
    out = []
    for t in range(frames):
        img = Image.new("RGB", (size, size), bg)
        cx, cy = round(x0 + dx * step * t), round(y0 + dy * step * t)
        fill = COLOURS[last_colour if t == frames - 1 else colour]
        ImageDraw.Draw(img).rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        out.append(img)
    return out


def _write_mp4(path: Path, frames: list, fps: int) -> None:
    import av
    import numpy as np

    tmp = path.with_name(path.name + ".partial")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}  # near-lossless: the colours must survive the encoder
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def make_video_demo(directory: str | Path, *, num_clips: int = 240, frames: int = 8, size: int = 32, fps: int = 4,
                    seed: int = 0, as_frames: bool = False) -> Path:
    """Write ``clips/`` and ``annotations.jsonl`` (ms-swift preference rows) under ``directory``; returns the
    annotations file. Deterministic for a seed."""
    if num_clips < 1 or frames < 2:
        raise ValueError(f"num_clips must be >= 1 and frames >= 2, got {num_clips} and {frames}")
    root = Path(directory)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_clips):
        colour = rng.choice(list(COLOURS))
        last = rng.choice([c for c in COLOURS if c != colour])
        direction = rng.choice(list(DIRECTIONS))
        clip = clip_frames(colour, last, direction, frames=frames, size=size, rng=rng)
        if as_frames:
            name = f"clips/clip_{i:05d}"
            (root / name).mkdir(exist_ok=True)
            for t, img in enumerate(clip):
                img.save(root / name / f"frame_{t:03d}.png")
        else:
            name = f"clips/clip_{i:05d}.mp4"
            _write_mp4(root / name, clip, fps)
        kind = "direction" if i % 2 == 0 else "last_colour"
        if kind == "direction":
            wrong = rng.choice([d for d in DIRECTIONS if d != direction])
            chosen, rejected, answer = f"The shape moves {direction}.", f"The shape moves {wrong}.", direction
        else:
            # neither the first frame's colour (a first-frame model could learn "not what I see") nor the right one
            wrong = rng.choice([c for c in COLOURS if c not in (colour, last)])
            chosen, rejected, answer = f"It is {last} in the last frame.", f"It is {wrong} in the last frame.", last
        rows.append({
            "id": f"video-demo-{i}-{kind}",
            "messages": [{"role": "user", "content": "<video>" + VIDEO_QUESTIONS[kind]},
                         {"role": "assistant", "content": chosen}],
            "rejected_response": rejected,
            "videos": [name],
            "truth": {"kind": kind, "answer": answer, "choices": list(_VOCABULARY[kind]), "first_colour": colour},
        })
    out = root / "annotations.jsonl"
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    return out


def video_answer_is_correct(question: str, answer: str, reference: str) -> bool:
    """Whether ``answer`` names the direction / last colour that ``reference`` (a right answer) names, and no other."""
    kind = next((k for k, q in VIDEO_QUESTIONS.items() if q in question), None)
    if kind is None:
        raise ValueError(f"not a video demo question: {question!r}")

    def named(text: str) -> set[str]:
        words = set(re.findall(r"[a-z]+", text.lower()))
        return {w for w in _VOCABULARY[kind] if w in words}

    expected = named(reference)
    if len(expected) != 1:
        raise ValueError(f"reference {reference!r} names {sorted(expected) or 'no'} {kind}, expected exactly one")
    return named(answer) == expected
