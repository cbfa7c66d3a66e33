"""Tiny videos made by the tests (coloured shapes moving, encoded with PyAV's bundled FFmpeg) and WebDataset shards
holding them in the sample schema of ``vpa-shard`` (``{key}.json`` with ``videos``, ``{key}.v0.mp4`` or
``{key}.v0.f0000.jpg``, ...), written with the stock ``webdataset.TarWriter`` as real shards are."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np


def moving_frames(n: int = 8, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """``[n, H, W, 3]`` uint8: a red square moving right and a blue bar moving down over a tinted background."""
    width, height = size
    background = np.array([40 + 30 * (seed % 5), 160, 90 + 20 * (seed % 3)], dtype=np.uint8)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    side = max(width // 4, 2)
    for t in range(n):
        frame = frames[t]
        frame[:] = background
        x = (t * 3 + seed) % max(width - side, 1)
        frame[height // 4 : height // 4 + side, x : x + side] = (220, 30, 30)
        y = (t * 2 + 2 * seed) % max(height - 4, 1)
        frame[y : y + 4, width // 2 :] = (30, 40, 220)
    return frames


def encode_video(frames: np.ndarray, fps: int = 4, fmt: str = "mp4", codec: str = "libx264") -> bytes:
    """The frames as a video file (H.264 in MP4 by default), in memory."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def empty_video() -> bytes:
    """A well-formed AVI with a video stream (MPEG-4, 32x32) and no frame."""
    import tempfile

    import av

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "empty.avi"
        with av.open(str(path), mode="w", format="avi") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            container.start_encoding()  # the header, with its stream, and nothing after it
        return path.read_bytes()


def encode_frames(frames: np.ndarray) -> list[bytes]:
    """Each frame as a JPEG (a video given as a frame list)."""
    from PIL import Image

    out = []
    for array in frames:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def video_sample(
    key: str,
    prompt: str,
    responses: list[str],
    videos: list[tuple[str, Any]],
    offsets: list[int] | None = None,
    images: list[tuple[bytes, int]] = (),
    pairs: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """One WebDataset sample dict for ``TarWriter``: ``videos`` are ``("file", bytes)`` (stored as ``v{i}.mp4``) or
    ``("frames", [jpeg bytes, ...])`` (``v{i}.f0000.jpg``, ...), at ``offsets`` in ``prompt`` (default 0);
    ``images`` are ``(png bytes, offset)``."""
    sample: dict[str, Any] = {"__key__": key}
    entries = []
    for i, (kind, data) in enumerate(videos):
        at = 0 if offsets is None else offsets[i]
        if kind == "file":
            member = f"v{i}.mp4"
            sample[member] = data
            entries.append({"kind": "file", "members": [member], "sha256": hashlib.sha256(data).hexdigest(), "offset": at})
        else:
            members = [f"v{i}.f{j:04d}.jpg" for j in range(len(data))]
            for member, frame in zip(members, data):
                sample[member] = frame
            digest = hashlib.sha256("\n".join(hashlib.sha256(f).hexdigest() for f in data).encode()).hexdigest()  # as the build
            entries.append({"kind": "frames", "members": members, "sha256": digest, "offset": at})
    image_entries = []
    for i, (data, at) in enumerate(images):
        sample[f"{i}.png"] = data
        image_entries.append({"member": f"{i}.png", "sha256": hashlib.sha256(data).hexdigest(), "offset": at})
    pairs = pairs if pairs is not None else [(0, j) for j in range(1, len(responses))]
    meta = {
        "key": key, "prompt": prompt, "image_sha256": image_entries[0]["sha256"] if image_entries else None,
        "images": image_entries, "videos": entries,
        "responses": [{"text": t, "model": f"m{r}", "scores": {"Helpfulness": float(5 - r)}, "strength": float(-r)}
                      for r, t in enumerate(responses)],
        "pairs": [{"chosen": c, "rejected": j, "probability": 0.8, "margin": float(j - c)} for c, j in pairs],
        "source": [{"file": "videos.jsonl", "line": 1}],
    }
    sample["json"] = json.dumps(meta).encode()
    return sample


def write_shard(path: Path, samples: list[dict[str, Any]]) -> Path:
    """The samples as one WebDataset shard (stock ``TarWriter``)."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def key(i: int) -> str:
    """A 20-hex-digit sample key, as the data core writes them."""
    return f"{i:020x}"
