"""A decoded video as the trainer hands it to a processor: its sampled frames and where they came from.

The data workers decode a shard's video (:mod:`vpa_lightning.data.video`) into a :class:`VideoClip`; a
family that takes video (:meth:`~vpa_lightning.models.families.Family.takes_video`) passes the frames to its
processor as an array, with transformers' ``VideoMetadata`` built from the clip, so the processor never samples
or loads anything itself (``do_sample_frames=False``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["VideoClip"]


@dataclass
class VideoClip:
    """The sampled frames of one video.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB array (numpy), T >= 1.
        fps: Frame rate of the source the frames were sampled from (frames per second of the
            ``total_frames``); ``None`` where unknown.
        total_frames: Frames of the source.
        indices: Index in the source of each sampled frame (``len(indices) == T``).
        name: The shard member it came from (for messages).
    """

    frames: Any
    fps: float | None
    total_frames: int
    indices: list[int] = field(default_factory=list)
    name: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def sampled_fps(self) -> float | None:
        """Frames per second of the sampled clip (what Qwen2.5-VL's temporal positions are spaced by)."""
        if self.fps is None or not self.total_frames:
            return None
        return len(self.indices) / self.total_frames * self.fps

    def metadata(self) -> Any:
        """transformers' ``VideoMetadata`` of the clip (the sampled frames' indices into the source)."""
        from transformers.video_utils import VideoMetadata

        height, width = int(self.frames.shape[1]), int(self.frames.shape[2])
        return VideoMetadata(
            total_num_frames=int(self.total_frames), fps=self.fps, width=width, height=height,
            duration=(self.total_frames / self.fps) if self.fps else None, video_backend="vpa",
            frames_indices=list(self.indices),
        )
