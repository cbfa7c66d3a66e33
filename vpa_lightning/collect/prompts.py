"""Prompts to sample answers for: 0..N images and a question per record, from the files people have.

Sources (:func:`read_prompts`, one or several):

* **JSON lines** or a **JSON list** of objects: the question is ``question``, ``prompt``, ``query`` or
  ``instruction`` (a string, or a user chat turn ``[{"role": "user", "content": ...}]`` / ``{"from": "human",
  "value": ...}`` list, as published layouts write them); the images are ``images``, ``image``, ``img_path`` or
  ``image_path``: a path (absolute, or relative to ``image_root``, default the file's folder), a list of paths, or
  ``{"bytes", "path"}`` structs (embedded images, as Hugging Face's ``datasets`` writes them); no image field = a
  text-only prompt. ``<image>`` placeholders in the question mark where each image sits (none: images first).
  Videos (for models that take video) are ``videos`` or ``video`` (both filled: rejected as ambiguous), as
  ``vpa-shard build`` reads them: one video or a list; a video is a video file's path, a frame folder's path (its
  images in natural order of their names), a list of frame image paths, or a ``{"bytes", "path"}`` struct; paths
  resolve like image paths. ``<video>`` placeholders (or ``{"type": "video"}`` blocks) place them (none: after the
  images, before the text).
  The id is ``id``, else the file's name and line. Every other field (a ground truth, say) travels along into the
  sampled file, where ``vpa judge --judge rule`` can read it; answer fields (``completions``, ``responses``,
  ``chosen``, ``rejected``, ``models``) are dropped.
* **Parquet** files (``pyarrow``): the same columns, embedded image structs included.
* A **shard folder** of ``vpa-shard build`` (``manifest.json``): the prompts and images of every sample, so the
  prompts of any published layout the data core reads (VLFeedback, RLAIF-V, ...) can be sampled again after one
  ``vpa-shard build``.

A record that cannot be used (no question, a missing or undecodable image or video, bad JSON) is rejected with its
file, line and reason; the counts add up (``read + rejected = records``). Images and videos are decoded lazily, when
a prompt is sampled (images checked against the pixel limit from their header first; videos decoded and sampled by
:func:`~vpa_lightning.data.video.load_video`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Prompt", "PromptReject", "read_prompts"]

_QUESTION_KEYS = ("question", "prompt", "query", "instruction")
_IMAGE_KEYS = ("images", "image", "img_path", "image_path")
_VIDEO_KEYS = ("videos", "video")
_ANSWER_KEYS = ("completions", "responses", "chosen", "rejected", "models", "reject")
PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
#: One video of a prompt: a video file's or frame folder's path, frame image paths, a file's bytes, frames' bytes.
VideoSource = str | bytes | list[str] | list[bytes]


@dataclass
class Prompt:
    """One prompt: its id, the question (without placeholders), its images and where they sit.

    Attributes:
        id: Unique within a run (the record's ``id``, else ``file:line``).
        question: The question text with the ``<image>`` placeholders removed.
        images: One entry per image: a path (str) or raw bytes.
        offsets: Characters of ``question`` before each image (``None``: images first).
        videos: One entry per video (:data:`VideoSource`).
        video_offsets: Characters of ``question`` before each video (``None``: after the images, before the text).
        extra: The record's other fields (carried into the sampled file).
        source: ``file:line`` (or ``file:index``) of the record.
    """

    id: str
    question: str
    images: list[str | bytes] = field(default_factory=list)
    offsets: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    videos: list[VideoSource] = field(default_factory=list)
    video_offsets: list[int] | None = None

    def load_videos(self, sampling: Any = None) -> list[Any]:
        """The videos as :class:`~vpa_lightning.models.video.VideoClip` (sampled frames) as ``sampling`` (a
        :class:`~vpa_lightning.data.video.VideoSampling`; ``None``: its defaults, 2 fps, at most 16 frames) says; a
        missing, empty or undecodable video raises ``ValueError`` naming it."""
        if not self.videos:
            return []
        from vpa_lightning.data.video import VideoSampling, load_video

        sampling = sampling if sampling is not None else VideoSampling()
        out = []
        for i, video in enumerate(self.videos):
            # a path names itself; embedded bytes get the prompt's name
            named = isinstance(video, str) or (isinstance(video, list) and bool(video) and isinstance(video[0], str))
            out.append(load_video(video, sampling, None if named else f"{self.id} video {i}"))
        return out

    def load_images(self, max_pixels: int | None = 89_478_485) -> list[Any]:
        """The images as RGB PIL images (a missing file or a bomb raises ``ValueError`` naming it)."""
        from PIL import Image

        out = []
        for image in self.images:
            what = f"image {image!r}" if isinstance(image, str) else "embedded image"
            try:
                data = Path(image).read_bytes() if isinstance(image, str) else image
                with Image.open(io.BytesIO(data)) as im:
                    if max_pixels is not None and im.width * im.height > max_pixels:
                        raise ValueError(f"{im.width}x{im.height} pixels, over the limit of {max_pixels}")
                    out.append(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError(f"{what}: {exc}") from exc
        return out

    def prompt_text(self) -> str:
        """The question with one ``<image>`` placeholder per image and one ``<video>`` per video where it sits (the
        layouts' convention; at one offset images first, as the trainer places them)."""
        if not self.images and not self.videos:
            return self.question
        if self.offsets is None and self.video_offsets is None:
            return PLACEHOLDER * len(self.images) + VIDEO_PLACEHOLDER * len(self.videos) + "\n" + self.question
        marks = sorted([(at, 0, PLACEHOLDER) for at in (self.offsets or [0] * len(self.images))]
                       + [(at, 1, VIDEO_PLACEHOLDER) for at in (self.video_offsets or [0] * len(self.videos))])
        text, last = [], 0
        for at, _, mark in marks:
            text += [self.question[last:at], mark]
            last = at
        return "".join(text) + self.question[last:]


@dataclass
class PromptReject:
    source: str
    reason: str


def _question(value: Any) -> str | None:
    """A question string from a string or a chat (the first user turn's text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for turn in value:
            if not isinstance(turn, dict):
                continue
            role = turn.get("role", turn.get("from"))
            if role in ("user", "human"):
                content = turn.get("content", turn.get("value"))
                if isinstance(content, list):  # {type: text|image} blocks
                    parts = []
                    for block in content:
                        if isinstance(block, dict) and block.get("type") == "image":
                            parts.append(PLACEHOLDER)
                        elif isinstance(block, dict) and block.get("type") == "video":
                            parts.append(VIDEO_PLACEHOLDER)
                        elif isinstance(block, dict) and isinstance(block.get("text"), str):
                            parts.append(block["text"])
                    return "".join(parts)
                return content if isinstance(content, str) else None
    return None


def _split_placeholders(text: str, n_images: int, n_videos: int = 0) -> tuple[str, list[int] | None, list[int] | None]:
    """``(question without placeholders, image offsets, video offsets)``; a kind's offsets are ``None`` when the
    text has none of its placeholders, both ``None`` when every placeholder comes before the text."""
    pieces = re.split(f"({re.escape(PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text)
    marks = pieces[1::2]
    if not marks:
        return text.strip(), None, None
    for mark, n, kind in ((PLACEHOLDER, n_images, "image"), (VIDEO_PLACEHOLDER, n_videos, "video")):
        count = marks.count(mark)
        if count and count != n:
            raise ValueError(f"{count} {mark} placeholders for {n} {kind}(s)")
    texts = pieces[0::2]
    if all(not p.strip() for p in texts[:-1]):  # every medium before the text: the usual "<image>\n..." prefix
        return texts[-1].strip(), None, None
    question, places = "", {PLACEHOLDER: [], VIDEO_PLACEHOLDER: []}
    for piece, mark in zip(texts, marks):
        question += piece
        places[mark].append(len(question))
    return (question + texts[-1], places[PLACEHOLDER] if PLACEHOLDER in marks else None,
            places[VIDEO_PLACEHOLDER] if VIDEO_PLACEHOLDER in marks else None)


def _embedded(item: Any) -> tuple[bytes | None, Any]:
    """``(bytes, None)`` for a ``{"bytes", "path"}`` struct with bytes (as ``datasets`` embeds media), else
    ``(None, what names the file)``: the struct's ``path``, or the item itself."""
    if isinstance(item, dict):
        data = item.get("bytes")
        if isinstance(data, (bytes, bytearray)) and data:
            return bytes(data), None
        return None, item.get("path")
    return None, item


def _images(value: Any, root: Path) -> list[str | bytes]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[str | bytes] = []
    for item in items:
        data, item = _embedded(item)
        if data is not None:
            out.append(data)
            continue
        if not isinstance(item, str) or not item:
            raise ValueError(f"image entry {str(item)[:100]!r} is neither a path nor embedded bytes")
        path = _local(item, root, "image")
        if not path.is_file():
            raise ValueError(f"image not found: {path}")
        out.append(str(path))
    return out


def _local(item: str, root: Path, what: str) -> Path:
    if "://" in item or item.startswith("pipe:"):
        raise ValueError(f"{what} {item!r} is a URL; {what}s are read from local files")
    return Path(item) if os.path.isabs(item) else root / item


def _videos(value: Any, root: Path, field_name: str) -> list[VideoSource]:
    """The videos a ``videos`` / ``video`` field names, as ``vpa-shard build`` reads it (see the module doc);
    null, ``""``, ``[]`` and ``{}`` name none. Paths are checked to exist (a file, or a folder of frames)."""
    if value is None or value in ("", [], {}):
        return []
    items = value if isinstance(value, list) else [value]
    out: list[VideoSource] = []
    for i, item in enumerate(items):
        where = f"{field_name}[{i}]" if isinstance(value, list) else field_name
        data, item = _embedded(item)
        if data is not None:
            out.append(data)
            continue
        if isinstance(item, list):
            if not item or not all(isinstance(f, str) and f.strip() for f in item):
                raise ValueError(f"{where}: a frame list must be a non-empty list of frame image paths")
            frames = [_local(f, root, "video frame") for f in item]
            missing = next((f for f in frames if not f.is_file()), None)
            if missing is not None:
                raise ValueError(f"{where}: video frame not found: {missing}")
            out.append([str(f) for f in frames])
            continue
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: {str(item)[:100]!r} is neither a video path, a frame list nor embedded bytes")
        path = _local(item, root, "video")
        if not path.exists():
            raise ValueError(f"{where}: video not found: {path}")
        out.append(str(path))
    return out


def _record(row: Any, source: str, root: Path, default_id: str) -> Prompt:
    if not isinstance(row, dict):
        raise ValueError("the record is not an object")
    raw = next((row[k] for k in _QUESTION_KEYS if row.get(k) is not None), None)
    text = _question(raw)
    if text is None or not text.replace(PLACEHOLDER, "").strip():
        raise ValueError(f"no question (one of {', '.join(_QUESTION_KEYS)}: a string or a user turn)")
    images = _images(next((row[k] for k in _IMAGE_KEYS if row.get(k) is not None), None), root)
    filled = [k for k in _VIDEO_KEYS if row.get(k) not in (None, "", [], {})]
    if len(filled) > 1:
        raise ValueError("both videos and video are filled (ambiguous: give one of them)")
    videos = _videos(row[filled[0]], root, filled[0]) if filled else []
    question, offsets, video_offsets = _split_placeholders(text, len(images), len(videos))
    rid = row.get("id", default_id)
    extra = {k: v for k, v in row.items() if k not in (*_QUESTION_KEYS, *_IMAGE_KEYS, *_VIDEO_KEYS, *_ANSWER_KEYS, "id")
             and _jsonable(v)}
    return Prompt(id=str(rid), question=question, images=images, offsets=offsets, extra=extra, source=source,
                  videos=videos, video_offsets=video_offsets)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(source, row)`` of a JSON list, JSON lines or Parquet file (``row`` is ``ValueError`` for a bad line)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        n = 0
        for batch in table.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:{n}", row
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" or head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            yield f"{path}", ValueError(f"invalid JSON: {exc}")
            return
        if not isinstance(data, list):
            yield f"{path}", ValueError("a JSON file of prompts must hold a list of objects")
            return
        for i, row in enumerate(data):
            yield f"{path}:{i}", row
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except (ValueError, RecursionError) as exc:
                yield f"{path}:{n}", ValueError(f"invalid JSON: {exc}")


def _shard_prompts(directory: Path) -> Iterator[tuple[str, Prompt | ValueError]]:
    """Prompts of a build's shards: every sample of every split (images as the PNG/JPEG bytes stored)."""
    import webdataset as wds

    from vpa_lightning.data.datamodule import resolve_shards
    from vpa_lightning.data.samples import SampleError, _image_members, _video_entries, decode_sample

    urls, val, _ = resolve_shards(str(directory))
    urls = (list(urls) if isinstance(urls, list) else [urls]) + (list(val) if isinstance(val, list) else [])
    for url in urls:
        for n, sample in enumerate(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()), start=1):
            source = f"{url}:{sample.get('__key__', n)}"
            try:
                meta = json.loads(sample["json"])
                # the videos are checked here and decoded when the prompt is sampled (never twice)
                videos = _video_entries(sample, meta, meta.get("prompt", "")) if isinstance(meta, dict) else []
                if videos:
                    sample = {**sample, "json": json.dumps({k: v for k, v in meta.items() if k != "videos"}).encode()}
                example = decode_sample(sample)
            except (SampleError, KeyError, ValueError) as exc:
                yield source, ValueError(str(exc))
                continue
            members, _ = _image_members(sample, meta, example.group.prompt)
            raw = [bytes(sample[m]) for m in members]  # the stored image bytes, as built (never re-encoded)
            group = example.group
            clips: list[VideoSource] = [bytes(sample[m[0]]) if kind == "file" else [bytes(sample[f]) for f in m]
                                        for kind, m, _, _ in videos]
            offsets = [o for *_, o in videos]
            yield source, Prompt(id=example.key, question=group.prompt, images=list(raw),
                                 offsets=list(group.image_offsets) if group.image_offsets is not None else None,
                                 source=source, videos=clips,
                                 video_offsets=offsets if clips and all(o is not None for o in offsets) else None)


def read_prompts(sources: list[str | os.PathLike[str]], image_root: str | os.PathLike[str] | None = None,
                 ) -> tuple[list[Prompt], list[PromptReject]]:
    """Every prompt of ``sources`` (files or shard folders, in order) and the rejects; ids are made unique
    (a repeated id gets ``#2``, ``#3``, ... so that no prompt is lost or merged silently)."""
    prompts: list[Prompt] = []
    rejects: list[PromptReject] = []
    for spec in sources:
        path = Path(spec)
        if path.is_dir():
            if not (path / "manifest.json").is_file():
                raise FileNotFoundError(f"{path} is a folder without manifest.json (not a vpa-shard build)")
            items = _shard_prompts(path)
        elif path.is_file():
            root = Path(image_root) if image_root is not None else path.parent

            def parsed(path: Path = path, root: Path = root) -> Iterator[tuple[str, Prompt | ValueError]]:
                for source, row in _rows(path):
                    if isinstance(row, ValueError):
                        yield source, row
                        continue
                    try:
                        yield source, _record(row, source, root, default_id=f"{path.stem}:{source.rsplit(':', 1)[-1]}")
                    except ValueError as exc:
                        yield source, exc

            items = parsed()
        else:
            raise FileNotFoundError(f"no such prompts file or shard folder: {path}")
        for source, item in items:
            if isinstance(item, ValueError):
                rejects.append(PromptReject(source, str(item)))
            else:
                prompts.append(item)
    seen: dict[str, int] = {}
    for p in prompts:
        n = seen.get(p.id, 0) + 1
        seen[p.id] = n
        if n > 1:
            p.id = f"{p.id}#{n}"
    return prompts, rejects


def image_digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]
