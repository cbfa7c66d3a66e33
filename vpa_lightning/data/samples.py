"""Decoding one WebDataset sample of a ``vpa-shard`` shard into a :class:`PreferenceExample` (the group,
its pairs and their per-pair data), with every way a sample can be malformed turned into :class:`SampleError`."""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vpa_lightning import rust_pairs as _rp
from vpa_lightning.models.logps import PreferenceGroup, offsets_place_images

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_EXTENSIONS", "PreferenceExample", "SampleError", "decode_sample", "parse_unpaired", "unpaired_labels"]

log = logging.getLogger(__name__)

#: Image members the trainer decodes: exactly the types the data core writes (one shared
#: definition, ``rust_pairs.IMAGE_EXTENSIONS``), plus ``jpeg`` for hand-made shards.
IMAGE_EXTENSIONS: tuple[str, ...] = (*_rp.IMAGE_EXTENSIONS, "jpeg")

#: Default pixel limit of a decoded image: Pillow's ``Image.MAX_IMAGE_PIXELS`` default
#: (about 89.5 megapixels, 0.25 GiB of RGB), the data core's default too.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class PreferenceExample:
    """One decoded group: the model-facing :class:`PreferenceGroup` plus its pairs.

    Attributes:
        key: The WebDataset sample key.
        group: Image (RGB PIL; ``None`` unless the sample has exactly one), prompt and the K
            response texts; ``group.id == key``.
        images: Every image of the sample (RGB PIL), in ``<image>`` placeholder order.
        videos: Every video of the sample (:class:`~vpa_lightning.models.video.VideoClip`: its sampled
            frames), in ``<video>`` placeholder order; also ``group.videos``.
        pairs: ``(chosen, rejected)`` response indices.
        probability: Bradley-Terry probability of each pair (``nan`` when absent).
        margin: Score margin of each pair (``nan`` when absent).
        scores: Mean score of each response over its rated aspects (``nan`` when unrated).
        strength: Bradley-Terry strength of each response (``nan`` when absent).
        ref_logps: Per pair, the reference log-probs the dataset shipped (the JSON's
            ``ref_logps``: ``{"chosen", "rejected", "model", ...}``, summed, chosen/rejected as the
            pair's), or ``None``.
        skipped: Keys of samples skipped before this one (for logging across workers).
    """

    key: str
    group: PreferenceGroup
    pairs: list[tuple[int, int]]
    probability: list[float]
    margin: list[float]
    images: list[Any] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    strength: list[float] = field(default_factory=list)
    ref_logps: list[dict[str, Any] | None] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: ``("rank/worker", epoch, n)``: this is the n-th example of that stream's pass (training; for resume).
    position: tuple[str, int, int] | None = None


class SampleError(ValueError):
    """A malformed sample (the message says why)."""


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _index(value: Any) -> int:
    # exact integers only: int() of a float would truncate 1.5 and overflow on Infinity
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"not an integer: {value!r}")
    return value


def decode_sample(
    sample: dict[str, Any], max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, video_sampling: Any = None
) -> PreferenceExample:
    """Decode one raw WebDataset sample (``{"__key__", "json", "png"|...}`` bytes) or raise :class:`SampleError`.

    An image of more than ``max_image_pixels`` pixels (``None``: no limit) is refused from its
    header, before any pixel is decoded. The JSON's ``videos`` (see :func:`_video_entries`) are decoded
    in this process as ``video_sampling`` (a :class:`~vpa_lightning.data.video.VideoSampling`; ``None``:
    its defaults) says; a sample without videos never imports the video decoder."""
    key = str(sample.get("__key__", "?"))
    raw = sample.get("json")
    if raw is None:
        raise SampleError("no .json member")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError; too deeply nested
        raise SampleError(f"invalid JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict):
        raise SampleError("JSON is not an object")
    prompt = meta.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise SampleError("missing or empty 'prompt'")
    responses = meta.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise SampleError("'responses' must be a list of at least 2 responses")
    texts, scores, strength = [], [], []
    for r, response in enumerate(responses):
        text = response.get("text") if isinstance(response, dict) else None
        if not isinstance(text, str) or not text:
            raise SampleError(f"response {r} has no text")
        texts.append(text)
        scores.append(_mean_score(response.get("scores")))
        strength.append(_float(response.get("strength")))
    pairs_raw = meta.get("pairs")
    if not isinstance(pairs_raw, list) or not pairs_raw:
        raise SampleError("no 'pairs'")
    pairs, probability, margin, ref_logps = [], [], [], []
    for p in pairs_raw:
        try:
            c, j = _index(p["chosen"]), _index(p["rejected"])
        except (TypeError, KeyError) as exc:
            raise SampleError(f"malformed pair {p!r}") from exc
        if not (0 <= c < len(texts) and 0 <= j < len(texts)) or c == j:
            raise SampleError(f"pair {p!r} out of range for {len(texts)} responses")
        pairs.append((c, j))
        probability.append(_float(p.get("probability")))
        margin.append(_float(p.get("margin")))
        ref_logps.append(_shipped_ref_logps(p.get("ref_logps")))
    members, offsets = _image_members(sample, meta, prompt)
    images = [_decode_image(sample[m], m, max_image_pixels) for m in members]
    entries = _video_entries(sample, meta, prompt)
    videos: list[Any] = []
    video_offsets: list[int] | None = None
    if entries:
        from vpa_lightning.data.video import VideoSampling, decode_video_file, decode_video_frames

        sampling = video_sampling if video_sampling is not None else VideoSampling(max_image_pixels=max_image_pixels)
        for kind, names, fps, _ in entries:
            if kind == "file":
                videos.append(decode_video_file(sample[names[0]], names[0], sampling))
            else:
                videos.append(decode_video_frames([sample[m] for m in names], names, sampling, fps))
        video_offsets = [o for *_, o in entries] if all(o is not None for *_, o in entries) else None
    group = PreferenceGroup(
        image=images[0] if len(images) == 1 else None, prompt=prompt, responses=texts, id=key, images=images,
        image_offsets=offsets, videos=videos or None, video_offsets=video_offsets if videos else None,
    )
    return PreferenceExample(
        key=key, group=group, pairs=pairs, probability=probability, margin=margin, images=images,
        scores=scores, strength=strength, ref_logps=ref_logps, videos=videos,
    )


def _shipped_ref_logps(value: Any) -> dict[str, Any] | None:
    """A pair's shipped reference log-probs (``{"chosen", "rejected", "model"}``), checked: finite
    numbers, ``model`` a string or absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SampleError(f"'ref_logps' is not an object: {value!r}")
    out = {k: _float(value.get(k)) for k in ("chosen", "rejected")}
    if not all(math.isfinite(v) and v <= 0 for v in out.values()):
        raise SampleError(f"'ref_logps' needs finite log-probs <= 0 for chosen and rejected, got {value!r}")
    model = value.get("model")
    if model is not None and not isinstance(model, str):
        raise SampleError(f"'ref_logps.model' is not a string: {model!r}")
    return {**out, "model": model}


def _image_members(sample: dict[str, Any], meta: dict[str, Any], prompt: str = "") -> tuple[list[str], list[int] | None]:
    """The sample's image fields in placeholder order and where each sits in ``prompt``: the
    JSON's ``images`` with their ``offset`` (format 2), or the one ``png``/``jpg``/... member of a
    format 1 sample. Offsets are ``None`` (every image before the text) when the JSON has none
    (format 1, and format 2 shards built before offsets were written)."""
    listed = meta.get("images")
    if listed is None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise SampleError(f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)})")
        return [ext], None
    if not isinstance(listed, list):
        raise SampleError("'images' is not a list")
    members, offsets = [], []
    for i, entry in enumerate(listed):
        member = entry.get("member") if isinstance(entry, dict) else None
        if not isinstance(member, str) or member not in sample:
            raise SampleError(f"image {i} ({member!r}) listed in the JSON has no member in the shard")
        if member.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
            raise SampleError(f"image {i} ({member!r}) is not one of the image types .{'/.'.join(IMAGE_EXTENSIONS)}")
        members.append(member)
        offsets.append(entry.get("offset"))
    if all(o is None for o in offsets):
        return members, None
    if not (all(type(o) is int for o in offsets) and offsets_place_images(offsets, len(prompt))):
        raise SampleError(f"image offsets {offsets} do not place the images in a prompt of {len(prompt)} characters")
    return members, offsets


def _video_entries(
    sample: dict[str, Any], meta: dict[str, Any], prompt: str
) -> list[tuple[str, list[str], float | None, int | None]]:
    """The JSON's ``videos``, checked: per video ``(kind, members, fps, offset)`` in placeholder order.

    An entry is ``{"kind": "file", "members": ["v0.mp4"], "sha256", "offset"}`` (one video file, any container
    FFmpeg reads) or ``{"kind": "frames", "members": ["v0.f0000.jpg", ...], "sha256", "offset"}`` (the frames
    in order, images of the types the shards hold; an optional ``"fps"`` says their rate). ``offset`` is where
    the ``<video>`` placeholder sat in the stored prompt, as an image's. Absent or ``[]``: no video."""
    listed = meta.get("videos")
    if listed is None:
        return []
    if not isinstance(listed, list):
        raise SampleError("'videos' is not a list")
    out = []
    for i, entry in enumerate(listed):
        if not isinstance(entry, dict):
            raise SampleError(f"video {i} is not an object: {entry!r}"[:300])
        kind, members = entry.get("kind"), entry.get("members")
        if kind not in ("file", "frames"):
            raise SampleError(f"video {i} has kind {kind!r}, not 'file' or 'frames'")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise SampleError(f"video {i} lists no members")
        if kind == "file" and len(members) != 1:
            raise SampleError(f"video {i} of kind 'file' lists {len(members)} members, not 1")
        missing = [m for m in members if m not in sample]
        if missing:
            raise SampleError(f"video {i} member {missing[0]!r} listed in the JSON is not in the shard")
        if kind == "frames":
            bad = [m for m in members if m.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS]
            if bad:
                raise SampleError(f"video {i} frame {bad[0]!r} is not one of the image types .{'/.'.join(IMAGE_EXTENSIONS)}")
        fps = entry.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0):
            raise SampleError(f"video {i} has fps {fps!r}, not a positive number")
        out.append((kind, list(members), None if fps is None else float(fps), entry.get("offset")))
    offsets = [o for *_, o in out]
    if any(o is not None for o in offsets) and not (
        all(type(o) is int for o in offsets) and offsets_place_images(offsets, len(prompt))
    ):
        raise SampleError(f"video offsets {offsets} do not place the videos in a prompt of {len(prompt)} characters")
    return out


def _decode_image(data: bytes, member: str, max_image_pixels: int | None) -> Image.Image:
    """RGB image from encoded bytes; the pixel count is checked on the header, before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_image_pixels is not None and width * height > max_image_pixels:
                raise SampleError(
                    f"image {member} of {width}x{height} = {width * height} pixels is over the limit of "
                    f"{max_image_pixels} (max_image_pixels)"
                )
            img.load()
            return img.convert("RGB")
    except SampleError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise SampleError(f"cannot decode image {member}: {type(exc).__name__}: {exc}") from exc


def _mean_score(scores: Any) -> float:
    """Mean of a response's numeric aspect scores (``nan`` when it has none)."""
    if not isinstance(scores, dict):
        return math.nan
    values = [v for v in (_float(x) for x in scores.values()) if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def parse_unpaired(spec: str | None) -> tuple[str, float] | None:
    """``--data.unpaired``: ``None``, ``"pairs"`` or ``"threshold:X"`` -> ``(mode, threshold)``."""
    if spec is None:
        return None
    if spec == "pairs":
        return ("pairs", math.nan)
    mode, _, value = spec.partition(":")
    if mode == "threshold":
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if math.isfinite(threshold):
            return ("threshold", threshold)
    raise ValueError(f"--data.unpaired must be 'pairs' or 'threshold:<score>' (e.g. threshold:3.5), got {spec!r}")


def unpaired_labels(example: PreferenceExample, mode: tuple[str, float]) -> list[int]:
    """Per response: 1 desirable, 0 undesirable, -1 unused.

    ``threshold``: mean score >= X is desirable, below is undesirable, unrated is unused.
    ``pairs``: chosen in some pair and rejected in none is desirable, the reverse undesirable,
    both (a middle response of all-pairs) unused.
    """
    kind, threshold = mode
    if kind == "threshold":
        return [-1 if math.isnan(x) else int(x >= threshold) for x in example.scores]
    won = {c for c, _ in example.pairs}
    lost = {j for _, j in example.pairs}
    return [1 if (r in won and r not in lost) else 0 if (r in lost and r not in won) else -1 for r in range(len(example.group.responses))]
