"""A benchmark item's video, decoded only when the runner reaches its batch.

A video benchmark's :class:`~vpa_lightning.eval.base.EvalItem` carries an :class:`EvalVideo` (where the video is
and which part of it counts), not frames: a benchmark of thousands of clips must never be held in memory at once.
The runner calls :meth:`EvalVideo.load` a batch at a time with the run's
:class:`~vpa_lightning.data.video.VideoSampling` (``video_fps`` / ``video_max_frames`` / ``video_max_pixels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

__all__ = ["EvalVideo"]


class _LazyFrames(Sequence[bytes]):
    """A frame folder's files read only when indexed (the sampler reads a few of hundreds of frames)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | list[bytes]:
        from vpa_lightning.data.samples import SampleError

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        try:
            return self.paths[i].read_bytes()
        except OSError as exc:
            raise SampleError(f"video frame {self.paths[i]}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class EvalVideo:
    """Where an item's video is.

    Attributes:
        path: A video file (any container FFmpeg reads, GIF included) or a folder of frame images.
        bound: ``(start, end)`` in seconds: only that segment counts (``None``: the whole video); sampled within
            it at the run's rate (see :func:`~vpa_lightning.data.video.segment`).
        frame_fps: Frames per second a frame folder's frames were extracted at (places ``bound`` and spaces the
            sampled frames); ``None``: taken at the run's ``video_fps`` already. Unused for video files, whose
            rate is in their header.
    """

    path: Path
    bound: tuple[float, float] | None = None
    frame_fps: float | None = None

    def load(self, sampling: Any) -> Any:
        """The sampled :class:`~vpa_lightning.models.video.VideoClip`; raises
        :class:`~vpa_lightning.data.samples.SampleError` naming the video (missing, no frames, undecodable)."""
        from vpa_lightning.data.samples import SampleError
        from vpa_lightning.data.video import decode_video_file, decode_video_frames, folder_frames, segment

        if self.path.is_dir():
            frames = folder_frames(self.path)
            if not frames:
                raise SampleError(f"frame folder {self.path} holds no frame images")
            rate = self.frame_fps if self.frame_fps is not None else sampling.fps
            first, count = segment(len(frames), rate, self.bound, str(self.path))
            part = frames[first : first + count]
            clip = decode_video_frames(_LazyFrames(part), [str(p) for p in part], sampling, fps=rate)
            clip.name = str(self.path)
            return clip
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise SampleError(f"video {self.path}: {exc.strerror or exc}") from exc
        return decode_video_file(data, str(self.path), sampling, bound=self.bound)
