"""Decoding a shard's videos in the data workers: a video file with PyAV, a list of frame images with Pillow.

The decoder is **PyAV** (``import av``): its wheels bundle FFmpeg (with libx264, VP9, AV1, ...), so
``pip install av`` is all a machine needs (no system FFmpeg, no torchvision video backend, no decord build),
and it decodes from bytes in memory, so a video never touches the disk between the shard and the model.

Sampling (:class:`VideoSampling`, the data module's ``video_fps`` / ``video_max_frames`` /
``video_max_pixels``): ``fps`` frames per second of the video (index ``i x source_fps / fps``), and at most
``max_frames`` of them, evenly spaced over the whole video when there are more; a frame over ``max_pixels``
pixels is scaled down to fit (keeping its aspect ratio) as it is converted, so a worker holds at most
``max_frames x max_pixels`` RGB pixels per video, and the processor gets the same limit as its own video size
argument. Only the sampled frames are converted (a frame list: only they are decoded).

A video that cannot be decoded (corrupt or truncated data, no video stream, no frame, frames over
``max_image_pixels`` by the header, decoding past :data:`DECODE_SECONDS`) raises
:class:`~vpa_lightning.data.samples.SampleError`: the sample is skipped and counted like an undecodable image.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vpa_lightning.data.samples import SampleError, _decode_image
from vpa_lightning.errors import VpaError
from vpa_lightning.models.video import VideoClip

__all__ = [
    "DECODE_SECONDS", "FRAME_EXTENSIONS", "VideoSampling", "decode_video_file", "decode_video_frames", "folder_frames",
    "load_video", "sample_indices", "segment",
]

#: File types of a frame folder's frames (as the data core's ``rust_pairs/src/video.rs``).
FRAME_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")

#: Wall-clock budget of decoding one video; past it the sample is skipped (a hostile or broken stream must not
#: hold a data worker).
DECODE_SECONDS = 120.0


@dataclass(frozen=True)
class VideoSampling:
    """How a video is sampled (see the module doc). ``fps`` / ``max_frames`` ``None``: no limit of that kind."""

    fps: float | None = 2.0
    max_frames: int | None = 16
    max_pixels: int | None = None
    max_image_pixels: int | None = None
    decode_seconds: float = DECODE_SECONDS
    #: Every video gets exactly ``max_frames`` frames, evenly spaced over its whole length (``fps`` not used; a clip
    #: with fewer frames repeats some): for the families that take a batch's videos as one tensor, which need one
    #: frame count (:meth:`~vpa_lightning.models.families.Family.video_sampling` sets it).
    exact_frames: bool = False


def sample_indices(total: int, source_fps: float | None, fps: float | None, max_frames: int | None,
                   exact: bool = False) -> list[int]:
    """Indices of the frames to keep of ``total`` frames at ``source_fps``: ``fps`` per second (all of them when
    either rate is unknown), at most ``max_frames``, evenly spaced from the first frame. ``exact``: exactly
    ``max_frames`` of them whatever the rate, evenly spaced (repeated where ``total`` is smaller)."""
    if total < 1:
        return []
    if exact and max_frames is not None:
        return [i * total // max_frames for i in range(max_frames)]
    n = total
    if fps is not None and source_fps:
        n = max(1, min(total, round(total * fps / source_fps)))
    if max_frames is not None:
        n = min(n, max_frames)
    return [i * total // n for i in range(n)]


def _scaled(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled down to at most ``max_pixels`` pixels (aspect ratio kept)."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _av():
    try:
        import av
    except ImportError as exc:  # a hard error, not a skipped sample: every video would fail
        raise VpaError(
            "the shards hold videos and decoding them needs PyAV: pip install av (or pip install '.[train]')"
        ) from exc
    return av


def _open(av: Any, data: bytes) -> Any:
    return av.open(io.BytesIO(data), mode="r")


def _count_frames(av: Any, data: bytes, deadline: float) -> int:
    """Video frames of the stream by its packets (demuxed, not decoded): for containers that record no count."""
    n = 0
    with _open(av, data) as container:
        try:
            for packet in container.demux(container.streams.video[0]):
                if packet.size:
                    n += 1
                if time.monotonic() > deadline:
                    raise SampleError("counting the frames took longer than the decode budget (DECODE_SECONDS)")
        except EOFError:  # a stream cut short ends where it ends
            pass
    return n


def segment(total: int, source_fps: float | None, bound: tuple[float, float] | None, member: str) -> tuple[int, int]:
    """``(first, count)``: the frames of ``total`` at ``source_fps`` within ``bound`` = ``(start, end)`` seconds
    (``None``: all of them). A start before 0 counts from 0 and an end past the video stops at its last frame, as
    MVBench's own reader does; a start past the last frame, an end before the start, or a bound on a video of
    unknown frame rate raises :class:`~vpa_lightning.data.samples.SampleError`."""
    if bound is None:
        return 0, total
    start, end = float(bound[0]), float(bound[1])
    if end < start:
        raise SampleError(f"video {member}: its bound ends ({end} s) before it starts ({start} s)")
    if not source_fps:
        raise SampleError(f"video {member} has no frame rate, so its bound [{start}, {end}] s cannot be placed")
    first = max(0, round(start * source_fps))
    if first >= total:
        raise SampleError(
            f"video {member}: its bound starts at {start} s, past its end ({total} frames at {source_fps:g} fps)"
        )
    last = min(max(first, round(end * source_fps)), total - 1)
    return first, last - first + 1


def decode_video_file(data: bytes, member: str, sampling: VideoSampling,
                      bound: tuple[float, float] | None = None) -> VideoClip:
    """Decode a video file's sampled frames from its bytes (any container and codec FFmpeg reads); ``bound``:
    only the ``(start, end)`` seconds of it (see :func:`segment`), which the clip then counts as its whole source
    (``total_frames`` and ``indices`` relative to the segment, so its sampled frame rate stays right)."""
    av = _av()
    deadline = time.monotonic() + sampling.decode_seconds
    try:
        with _open(av, data) as container:
            if not container.streams.video:
                raise SampleError(f"video {member} has no video stream")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            limit = sampling.max_image_pixels
            if limit is not None and width * height > limit:
                raise SampleError(
                    f"video {member} of {width}x{height} = {width * height} pixels per frame is over the limit of "
                    f"{limit} (max_image_pixels)"
                )
            rate = stream.average_rate or stream.guessed_rate
            source_fps = float(rate) if rate else None
            total = int(stream.frames or 0)
        if total < 1:
            total = _count_frames(av, data, deadline)
        if total < 1:
            raise SampleError(f"video {member} has no frames")
        first, count = segment(total, source_fps, bound, member)
        wanted = [first + i for i in sample_indices(count, source_fps, sampling.fps, sampling.max_frames, sampling.exact_frames)]
        frames, decoded = _decode_at(av, data, wanted, sampling.max_pixels, deadline)
        if len(frames) < len(wanted):  # the stream ended early (the container's count was wrong, a truncated file)
            if decoded < 1:
                raise SampleError(f"video {member} has no decodable frame")
            total = decoded
            first, count = segment(total, source_fps, bound, member)
            wanted = [first + i for i in sample_indices(count, source_fps, sampling.fps, sampling.max_frames, sampling.exact_frames)]
            frames, _ = _decode_at(av, data, wanted, sampling.max_pixels, deadline)
        indices = [i for i in wanted if i in frames]  # in order, a repeated index repeated (exact_frames)
        if not indices:
            raise SampleError(f"video {member} has no decodable frame")
        array = np.stack([frames[i] for i in indices])
    except (SampleError, VpaError):
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg reports corrupt data with many error types
        raise SampleError(f"cannot decode video {member}: {type(exc).__name__}: {exc}") from exc
    return VideoClip(frames=array, fps=source_fps, total_frames=count, indices=[i - first for i in indices], name=member)


def _decode_at(av: Any, data: bytes, wanted: list[int], max_pixels: int | None, deadline: float) -> tuple[dict[int, Any], int]:
    """``({index: [H, W, 3] uint8}, frames decoded)``: the frames at ``wanted`` (in decode order), converting only
    those and decoding no further than the last of them."""
    keep = set(wanted)
    last = max(wanted, default=-1)
    out: dict[int, Any] = {}
    n = 0
    with _open(av, data) as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                if n in keep:
                    w, h = _scaled(frame.width, frame.height, max_pixels)
                    out[n] = frame.to_ndarray(format="rgb24", width=w, height=h)
                n += 1
                if n > last:
                    break
                if time.monotonic() > deadline:
                    raise SampleError("decoding took longer than the decode budget (DECODE_SECONDS)")
        except EOFError:  # a stream cut short ends where it ends
            pass
    return out, n


def decode_video_frames(datas: Sequence[bytes], members: Sequence[str], sampling: VideoSampling,
                        fps: float | None = None) -> VideoClip:
    """A video given as a list of frame images (``v0.f0000.jpg``, ...), in order, taken at ``fps`` frames per
    second (``None``: as sampled at ``sampling.fps`` already, so every frame is kept up to ``max_frames``). Only
    the sampled frames are decoded; each is checked like an image (``max_image_pixels`` from its header); frames
    of another size than the first are resized to it."""
    total = len(datas)
    if total < 1:
        raise SampleError("video has no frames")
    source_fps = fps if fps is not None else sampling.fps
    indices = sample_indices(total, source_fps, sampling.fps, sampling.max_frames, sampling.exact_frames)
    frames: list[Any] = []
    size: tuple[int, int] | None = None
    for i in indices:
        image = _decode_image(datas[i], members[i], sampling.max_image_pixels)
        if size is None:
            size = _scaled(image.width, image.height, sampling.max_pixels)
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        frames.append(np.asarray(image, dtype=np.uint8))
    return VideoClip(frames=np.stack(frames), fps=source_fps, total_frames=total, indices=indices,
                     name=members[0] if members else "")


def _natural_key(name: str) -> tuple[Any, ...]:
    """Natural order of names, as the data core's ``natural_cmp``: digit runs by value (``frame_2`` before
    ``frame_10``), more leading zeros after, then the names themselves."""
    parts = re.split(r"(\d+)", name)
    key = tuple((0, int(p), len(p)) if i % 2 else (1, p, 0) for i, p in enumerate(parts) if p)
    return key, name


def folder_frames(folder: str | os.PathLike[str]) -> list[Path]:
    """A frame folder's frames (the LLaVA-Hound / ShareGPT-Video layout): its image files (hidden files and
    sub-folders left out) in natural order of their names, as ``vpa-shard build`` orders them."""
    folder = Path(folder)
    names = [e.name for e in folder.iterdir() if not e.name.startswith(".")
             and e.name.rsplit(".", 1)[-1].lower() in FRAME_EXTENSIONS and "." in e.name and not e.is_dir()]
    return [folder / n for n in sorted(names, key=_natural_key)]


def load_video(video: str | os.PathLike[str] | bytes | Sequence[Any], sampling: VideoSampling,
               name: str | None = None) -> VideoClip:
    """Decode one video given as the prompt files give it: a video file's path, a frame folder's path, a list of
    frame image paths (in order) or of frame bytes, or a video file's bytes. Frame lists count as taken at
    ``sampling.fps`` (see :func:`decode_video_frames`). Raises :class:`~vpa_lightning.data.samples.SampleError`
    naming the video (missing, no frames, undecodable)."""
    if isinstance(video, (bytes, bytearray)):
        return decode_video_file(bytes(video), name or "embedded video", sampling)
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if path.is_dir():
            frames = folder_frames(path)
            if not frames:
                raise SampleError(f"frame folder {path} holds no frame images (*.{', *.'.join(FRAME_EXTENSIONS)})")
            return load_video(frames, sampling, name or str(path))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SampleError(f"video {path}: {exc.strerror or exc}") from exc
        return decode_video_file(data, name or str(path), sampling)
    items = list(video)
    if not items:
        raise SampleError(f"video {name or ''} has no frames".replace("  ", " "))
    datas, members = [], []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            datas.append(bytes(item))
            members.append(f"{name or 'video'} frame {i}")
            continue
        try:
            datas.append(Path(item).read_bytes())
        except OSError as exc:
            raise SampleError(f"video frame {item}: {exc.strerror or exc}") from exc
        members.append(str(item))
    clip = decode_video_frames(datas, members, sampling)
    clip.name = name or members[0]
    return clip
