"""Lightning data module that streams preference groups from ``vpa-shard`` WebDataset shards.

One WebDataset sample is one *group*: its images (``{key}.0.jpg``,
``{key}.1.png``, ... as listed in the JSON's ``images``, in ``<image>``
placeholder order; format 1 shards have one ``{key}.png|jpg``), a prompt,
K >= 2 responses and the preference pairs among them (indices into the
responses). The data module

1. streams the shards with stock WebDataset stages (:class:`ExampleStream`:
   for training the shard order is shuffled per epoch, then split by node and
   by DataLoader worker),
2. decodes each sample into a :class:`PreferenceExample` (image to an RGB
   PIL image, JSON checked), skipping malformed samples (see below),
3. shuffles groups in a buffer (training only),
4. batches ``batch_size`` groups and tokenises them with the model's processor
   (:func:`vpa_lightning.models.logps.build_group_batch`) in the collate
   function, which runs in the DataLoader workers.

A batch is a ``dict``:

``inputs``
    :class:`~vpa_lightning.models.logps.GroupBatch`: all K responses of all
    groups as ``N = sum(K)`` rows (moved to the device by Lightning).
``chosen`` / ``rejected``
    ``[P]`` long tensors: for every pair of every group, the row of the chosen
    / rejected response in the flat list of ``N`` responses.
``pair_group``
    ``[P]`` long: the group (index in the batch) of each pair.
``probability`` / ``margin``
    ``[P]`` float: the pair's Bradley-Terry probability and score margin
    from the shards (``nan`` when absent).
``keys``
    The sample keys of the groups (``list[str]``, length ``G``).
``response_index``
    ``[N]`` long: the index of each row's response inside its group (with
    ``keys`` this identifies a response, e.g. for the reference cache).
``response_sha``
    ``list[str]`` (length ``N``): a short hash of each row's response text.
``response_score`` / ``response_strength``
    ``[N]`` float: each response's mean score (over its rated aspects) and its Bradley-Terry
    strength from the shard (``nan`` when absent); the listwise losses rank by them.
``data_ref_logps`` / ``data_ref_model``
    ``[N]`` float and ``list[str | None]``: each row's reference log-prob (summed) as the dataset
    shipped it (the pair JSON's ``ref_logps``, e.g. MM-DPO's ``ref_win_logp``/``ref_rej_logp``)
    and the model recorded for it (``nan`` / ``None`` where no shipped pair covers the row); used
    by ``--model.ref_logps_from_data``.
``response_label``
    ``[N]`` long, only with ``unpaired``: 1 desirable, 0 undesirable, -1 unused (KTO).
``kl_inputs``
    Only when the loss asks for mismatched pairs (KTO's reference point): a
    :class:`~vpa_lightning.models.logps.GroupBatch` of each group's image + prompt with the
    previous group's responses (``None`` for a batch of one group).
``max_length``
    The ``max_length`` used for tokenisation (``int`` or ``None``).
``skipped``
    Keys (or shard URLs) of samples dropped since the previous batch of this
    worker (see below).

Processor
---------
The collate function needs the model's processor. Pass ``processor=`` to the
constructor, or leave it ``None``: in :meth:`PreferenceDataModule.setup` the
data module then takes ``trainer.lightning_module.processor`` (what
:class:`vpa_lightning.module.VisionDPOModule` exposes), so with
``LightningCLI`` / ``trainer.fit(module, datamodule)`` nothing needs wiring.

Malformed samples
-----------------
A sample whose image cannot be decoded or has more than ``max_image_pixels``
pixels (checked on the header), whose JSON is invalid, too deeply nested or
misses fields, whose pair indices are not integers in range, whose decoding
raises anything else, or whose tokenisation fails (e.g. the prompt alone
exceeds ``max_length``) is skipped: a warning naming its key, shard and reason
is logged (logger ``vpa_lightning.data.datamodule``), it is counted in
:attr:`PreferenceDataModule.skipped` (``{reason: count}``, per process: with
``num_workers > 0`` each worker process keeps its own count) and its key
travels with the next batch in ``batch["skipped"]`` so the training module can
log the total across workers. A shard that turns unreadable while it is read
(truncated tar) is skipped the same way from the failing point on. No sample
crashes the run.

Before the first read (:func:`check_shards`) every local shard must exist as a
regular file, not all may be empty, and shards named by a manifest must have
its sizes (``verify_shards``); a training epoch (or fit) that yields no usable
batch fails in the training module. So a run on data that gives nothing fails,
naming the path and the reason, instead of succeeding with 0 steps.

Exact resume
------------
Every pass is a pure function of (``seed``, epoch, rank, worker), the epoch
being the trainer's counter (which checkpoints restore). The data module counts
the training examples the steps consumed per rank and worker stream and saves
them in the checkpoint (:meth:`PreferenceDataModule.state_dict`, with the shard
sha256s, the stream settings and the RNG states); a resumed run replays the
epoch's stream up to that point without training on it and restores the RNG
state before its first step, so 2 steps + resume + 2 steps equals 4 straight
steps bit for bit on CPU. A resume whose shards, seed, batch size, buffer,
workers or world size changed logs ``resume is not exact: ...`` (with other
workers or ranks the epoch restarts). Training workers start afresh each epoch
(``persistent_workers`` only for validation), so they see the epoch.

Text-only and multi-image samples
---------------------------------
Shards may hold samples with no image (text-only preference rows, e.g. to keep
language skills, as MM-DPO mixes in) or with several. Both train:
:attr:`PreferenceExample.images` (also ``group.images``) holds every image in
placeholder order; a text-only prompt is tokenised without image parts and its
rows carry no pixel inputs, and a prompt with images is cut at each image's
``offset`` (from the shard JSON) with an image part in each cut, so the chat
template puts every image where the prompt had it (no offsets, as in format 1
shards: every image before the text); a batch may mix them (see
:func:`~vpa_lightning.models.logps.build_group_batch`). A family whose
processor cannot take a sample (PaliGemma without an image) skips it with the
reason ``tokenisation``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import lightning.pytorch as pl
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vpa_lightning import rust_pairs as _rp
from vpa_lightning.data.shards import ManifestError, load_manifest
from vpa_lightning.errors import BadShardsError, MissingShardsError, TooManySkippedError, UsageError
from vpa_lightning.models.families import family_of
from vpa_lightning.models.logps import PreferenceGroup, build_group_batch, offsets_place_images, prompt_messages

__all__ = [
    "IMAGE_EXTENSIONS",
    "GroupCollator",
    "PreferenceDataModule",
    "PreferenceExample",
    "check_shards",
    "decode_sample",
    "resolve_shards",
]

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


def decode_sample(sample: dict[str, Any], max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PreferenceExample:
    """Decode one raw WebDataset sample (``{"__key__", "json", "png"|...}`` bytes) or raise :class:`SampleError`.

    An image of more than ``max_image_pixels`` pixels (``None``: no limit) is refused from its
    header, before any pixel is decoded."""
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
    group = PreferenceGroup(
        image=images[0] if len(images) == 1 else None, prompt=prompt, responses=texts, id=key, images=images,
        image_offsets=offsets,
    )
    return PreferenceExample(
        key=key, group=group, pairs=pairs, probability=probability, margin=margin, images=images,
        scores=scores, strength=strength, ref_logps=ref_logps,
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


class _SkipLog:
    """Per-process record of skipped samples: ``counts`` by reason and keys pending report."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.pending: list[str] = []

    def skip(self, what: str, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.pending.append(f"{what}: {detail}"[:300])
        log.warning("skipping %s: %s", what, detail)

    def shard_error(self, exn: Exception) -> bool:
        """WebDataset exception handler: log, count and continue with the next shard."""
        # WebDataset appends the shard URL to exn.args; OSError's repr would hide it
        detail = f"{type(exn).__name__}: {', '.join(str(a) for a in exn.args)}"
        self.skip(f"shard data ({detail})", "shard", detail)
        return True

    def take(self) -> list[str]:
        pending, self.pending = self.pending, []
        return pending


class _DecodeStage:
    """WebDataset pipeline stage: raw samples -> :class:`PreferenceExample`, malformed ones skipped.

    Any exception a sample raises (not only :class:`SampleError`: ``RecursionError`` from deep
    JSON, ``OverflowError``, a Pillow bug) skips that sample; only ``max_skips_without_example``
    skips in a row before any usable sample fail the pass, so that resampled shards that are all
    bad raise instead of being drawn forever.
    """

    def __init__(
        self, skips: _SkipLog, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, max_skips_without_example: int | None = None
    ) -> None:
        self.skips = skips
        self.max_image_pixels = max_image_pixels
        self.max_skips_without_example = max_skips_without_example

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[PreferenceExample]:
        good, bad = 0, 0
        for sample in src:
            key = str(sample.get("__key__", "?"))
            what = f"sample {key!r} ({sample.get('__url__', '?')})"
            try:
                example = decode_sample(sample, self.max_image_pixels)
            except Exception as exc:  # noqa: BLE001 - whatever a bad sample raises, it must not end the run
                detail = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"[:500]
                self.skips.skip(what, "malformed_sample", detail)
                bad += 1
                if not good and self.max_skips_without_example is not None and bad >= self.max_skips_without_example:
                    raise RuntimeError(
                        f"{bad} samples in a row were malformed and none was usable (last: {what}: {detail}); "
                        "see the warnings for each"
                    ) from exc
                continue
            good += 1
            example.skipped = self.skips.take()
            yield example


#: Malformed samples in a row, before any usable one, after which resampled training fails.
_MAX_SKIPS_WITHOUT_EXAMPLE = 10_000


class _ShuffleStage:
    """Buffered shuffle seeded by (seed, epoch, rank, worker): one pass is reproducible from its epoch."""

    def __init__(self, bufsize: int, seed: int, epoch: int) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
        buf: list[Any] = []
        for item in src:
            if len(buf) < self.bufsize:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf


class ExampleStream(torch.utils.data.IterableDataset):
    """The :class:`PreferenceExample` s of ``urls`` for one pass: a pure function of (seed, epoch, rank, worker).

    Training: the shard order is shuffled by (seed, epoch) (the same on every rank and worker),
    then split across ranks and DataLoader workers; decoded groups go through a buffer shuffle
    seeded by (seed, epoch, rank, worker). With ``per_worker`` shards are drawn with replacement
    (WebDataset ``ResampledShards``, seeded the same way) and each worker yields ``per_worker``
    examples. ``epoch`` is set before each pass (by the trainer's epoch counter, which a checkpoint
    restores). ``resume = {"epoch": e, "positions": {"rank/worker": n}}`` makes pass ``e`` drop
    the first ``n`` examples of each stream: the pass is replayed (shards read and decoded, no model
    work) up to where the checkpointed run stopped, so it continues with exactly the next example.
    """

    def __init__(
        self,
        urls: str | list[str],
        decode: _DecodeStage,
        *,
        seed: int = 0,
        train: bool = False,
        shuffle_buffer: int = 0,
        per_worker: int | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__()
        self.urls = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else list(urls)
        self.decode, self.seed, self.train, self.shuffle_buffer = decode, seed, train, shuffle_buffer
        self.per_worker, self.workers = per_worker, workers
        self.epoch = 0
        self.resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        if self.per_worker is None:
            raise TypeError("a pass over the shards has no length known in advance")
        return self.per_worker * self.workers

    def _pipeline(self) -> tuple[Iterator[PreferenceExample], str]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        if self.per_worker is not None:
            shards = wds.ResampledShards(self.urls, seed=self.seed, deterministic=True, empty_check=False)
            shards.epoch = self.epoch - 1  # it counts passes itself: start it at this one
            stages: list[Any] = [shards]
        else:
            urls = list(self.urls)
            if self.train:
                random.Random(f"{self.seed}-{self.epoch}").shuffle(urls)
            stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
        stages += [wds.tarfile_to_samples(handler=self.decode.skips.shard_error), self.decode]
        if self.train and self.shuffle_buffer > 0:
            stages.append(_ShuffleStage(self.shuffle_buffer, self.seed, self.epoch))
        examples: Iterator[PreferenceExample] = iter(wds.DataPipeline(*stages))
        if self.per_worker is not None:
            examples = itertools.islice(examples, self.per_worker)
        return examples, f"{rank}/{worker}"

    def __iter__(self) -> Iterator[PreferenceExample]:
        examples, where = self._pipeline()
        resume = self.resume
        skip = int(resume["positions"].get(where, 0)) if resume and resume.get("epoch") == self.epoch else 0
        for n, example in enumerate(examples, 1):
            if n > skip:
                example.position = (where, self.epoch, n)
                yield example


def _rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python) in types ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class _TrainLoader(DataLoader):
    """A DataLoader that sets its :class:`ExampleStream`'s epoch before each pass (``epoch_of()``,
    the trainer's epoch counter; without a trainer, passes are counted)."""

    epoch_of: Any = None
    resume_of: Any = None
    max_skip_fraction: float | None = None
    passes = 0

    def __iter__(self):
        epoch = self.epoch_of() if self.epoch_of is not None else None
        self.dataset.epoch = self.passes if epoch is None else epoch
        if self.resume_of is not None:
            self.dataset.resume = self.resume_of()
        self.passes += 1
        batches = super().__iter__()
        if epoch is None or self.max_skip_fraction is None or self.max_skip_fraction >= 1:
            return batches  # no trainer: plain iteration never fails on skips
        return _watch_skips(batches, self.max_skip_fraction, epoch)


#: Samples seen in an epoch before the skip share is checked batch by batch (it is always checked at the end).
_SKIP_CHECK_AFTER = 64


def _watch_skips(batches: Iterator[dict[str, Any]], max_fraction: float, epoch: int) -> Iterator[dict[str, Any]]:
    """Pass the batches through; raise :class:`TooManySkippedError` when more than ``max_fraction``
    of the epoch's samples so far were skipped (the batches carry the skipped samples' reasons,
    from every worker)."""
    used = skipped = 0
    reasons: list[str] = []

    def check() -> None:
        total = used + skipped
        if skipped and skipped > max_fraction * total:
            raise TooManySkippedError(
                f"{skipped} of {total} training samples ({skipped / total:.1%}) were skipped in epoch {epoch}, more than "
                f"--data.max_skip_fraction {max_fraction:g}; first reasons: " + "; ".join(reasons)
                + ". Fix the data (a warning names each sample) or raise --data.max_skip_fraction (1 never fails)."
            )

    for batch in batches:
        used += len(batch.get("keys", ()))
        skipped += len(batch.get("skipped", ()))
        reasons += batch.get("skipped", [])[: max(5 - len(reasons), 0)]
        if used + skipped >= _SKIP_CHECK_AFTER:
            check()
        yield batch
    check()


def _response_sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _rows_shipped_ref(examples: Sequence[PreferenceExample]) -> tuple[torch.Tensor, list[str | None]]:
    """``([N] float, [N] model)``: each row's shipped reference log-prob (summed) and the model it
    came from, taken from the pairs that name the row (as chosen or rejected; the first such pair
    when several do); ``nan`` / ``None`` for a row no shipped pair covers."""
    values: list[float] = []
    models: list[str | None] = []
    for e in examples:
        row = [math.nan] * len(e.group.responses)
        model: list[str | None] = [None] * len(e.group.responses)
        for (c, j), lp in zip(e.pairs, e.ref_logps or []):
            if lp is None:
                continue
            for r, v in ((c, lp["chosen"]), (j, lp["rejected"])):
                if math.isnan(row[r]):
                    row[r], model[r] = v, lp["model"]
        values += row
        models += model
    return torch.tensor(values, dtype=torch.float32), models


class GroupCollator:
    """Collate :class:`PreferenceExample` s into a batch dict (see the module docstring).

    Picklable (runs in DataLoader workers). A group whose tokenisation fails is
    dropped with a warning; the batch keeps the others.

    Args:
        processor: The model's multimodal processor.
        max_length: Passed to :func:`build_group_batch`.
        skips: Where dropped groups are counted (the data module's record).
        unpaired: ``parse_unpaired`` output: add ``response_label`` (KTO).
        mismatched_pairs: Add ``kl_inputs`` (KTO's reference point).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        skips: _SkipLog | None = None,
        unpaired: tuple[str, float] | None = None,
        mismatched_pairs: bool = False,
        score_trailing_newline: bool = False,
    ) -> None:
        self.processor = processor
        self.max_length = max_length
        self.score_trailing_newline = score_trailing_newline
        self.skips = skips if skips is not None else _SkipLog()
        self.unpaired = unpaired
        self.mismatched_pairs = mismatched_pairs

    def __call__(self, examples: Sequence[PreferenceExample]) -> dict[str, Any]:
        examples = list(examples)
        skipped = [k for e in examples for k in e.skipped]
        reached: dict[tuple[str, int], int] = {}  # the furthest example of each stream in this batch
        for e in examples:
            if e.position is not None:
                where, epoch, n = e.position
                reached[(where, epoch)] = max(n, reached.get((where, epoch), 0))
        try:
            inputs = self._build([e.group for e in examples])
        except Exception:  # noqa: BLE001 - a bad group must not stop training: find and drop it
            kept = []
            for e in examples:
                try:
                    self._build([e.group])
                except Exception as exc:  # noqa: BLE001
                    self.skips.skip(f"sample {e.key!r}", "tokenisation", f"{type(exc).__name__}: {exc}")
                else:
                    kept.append(e)
            examples = self._compatible(kept)
            skipped += self.skips.take()
            inputs = self._build([e.group for e in examples]) if examples else None
        chosen, rejected, pair_group, probability, margin, response_index, response_sha = [], [], [], [], [], [], []
        offset = 0
        for g, e in enumerate(examples):
            for (c, j), p, m in zip(e.pairs, e.probability, e.margin):
                chosen.append(offset + c)
                rejected.append(offset + j)
                pair_group.append(g)
                probability.append(p)
                margin.append(m)
            response_index.extend(range(len(e.group.responses)))
            response_sha.extend(_response_sha(t) for t in e.group.responses)
            offset += len(e.group.responses)
        data_ref, data_ref_model = _rows_shipped_ref(examples)
        extra: dict[str, Any] = {}
        if self.unpaired is not None:
            labels = [x for e in examples for x in unpaired_labels(e, self.unpaired)]
            extra["response_label"] = torch.tensor(labels, dtype=torch.long)
        if self.mismatched_pairs:
            extra["kl_inputs"] = self._mismatched(examples)
        return {
            **extra,
            "response_score": torch.tensor([x for e in examples for x in e.scores], dtype=torch.float32),
            "response_strength": torch.tensor([x for e in examples for x in e.strength], dtype=torch.float32),
            "inputs": inputs,
            "chosen": torch.tensor(chosen, dtype=torch.long),
            "rejected": torch.tensor(rejected, dtype=torch.long),
            "pair_group": torch.tensor(pair_group, dtype=torch.long),
            "probability": torch.tensor(probability, dtype=torch.float32),
            "margin": torch.tensor(margin, dtype=torch.float32),
            "keys": [e.key for e in examples],
            "response_index": torch.tensor(response_index, dtype=torch.long),
            "response_sha": response_sha,
            "data_ref_logps": data_ref,
            "data_ref_model": data_ref_model,
            "max_length": self.max_length,
            "skipped": skipped,
            "position": [(where, epoch, n) for (where, epoch), n in reached.items()],
        }

    def _compatible(self, examples: list[PreferenceExample]) -> list[PreferenceExample]:
        """The examples that tokenise together: all of them, else greedily in order (a family may
        refuse some mixes, e.g. Mllama text-only with image groups); the others are skipped."""
        try:
            self._build([e.group for e in examples])
            return examples
        except Exception:  # noqa: BLE001
            pass
        kept: list[PreferenceExample] = []
        for e in examples:
            try:
                self._build([k.group for k in [*kept, e]])
            except Exception as exc:  # noqa: BLE001
                self.skips.skip(f"sample {e.key!r}", "tokenisation", f"cannot share a batch: {type(exc).__name__}: {exc}")
            else:
                kept.append(e)
        return kept

    def _build(self, groups: Sequence[Any]) -> Any:
        return build_group_batch(
            self.processor, groups, max_length=self.max_length, score_trailing_newline=self.score_trailing_newline
        )

    def _mismatched(self, examples: Sequence[PreferenceExample]) -> Any:
        """Each group's image + prompt with the previous group's responses (TRL's KTO ``KL`` pairs)."""
        if len(examples) < 2:
            return None
        groups = [
            dataclasses.replace(e.group, responses=examples[g - 1].group.responses, id=f"{e.key}/kl")
            for g, e in enumerate(examples)
        ]
        try:
            return self._build(groups)
        except Exception as exc:  # noqa: BLE001 - no reference point this step is better than no step
            log.warning("mismatched pairs for KTO's reference point failed (%s: %s); z0 = 0 this batch", type(exc).__name__, exc)
            return None


def resolve_shards(
    train_shards: str, val_shards: str | None = None, expected: dict[str, dict] | None = None
) -> tuple[str | list[str], str | list[str] | None, dict[str, int]]:
    """Resolve the ``train_shards`` / ``val_shards`` arguments of :class:`PreferenceDataModule`.

    A local directory with ``manifest.json`` gives its ``train`` shards (and its
    ``val`` shards unless ``val_shards`` is set) as absolute file paths: a manifest names files
    relative to it, never a URL or a ``pipe:`` command (:class:`ManifestError` otherwise).
    Anything else is typed by the user and passed to WebDataset as is (a path, brace notation
    ``shard-{000000..000009}.tar``, ``::``-separated lists, ``pipe:`` / ``http(s)://`` URLs).

    Args:
        expected: Filled with ``{path: manifest shard entry}`` for every shard a manifest named
            (what :func:`check_shards` verifies sizes and hashes against).

    Returns:
        ``(train_urls, val_urls, counts)`` where ``counts`` has ``train_samples``,
        ``train_pairs``, ``val_samples``, ``val_pairs`` when a manifest was read.
    """
    counts: dict[str, int] = {}

    def from_manifest(spec: str, split: str) -> list[str] | None:
        shards = _manifest_shards(spec, split)
        if shards is None:
            return None
        counts[f"{split}_samples"] = sum(int(e.get("samples", 0)) for _, e in shards)
        counts[f"{split}_pairs"] = sum(int(e.get("pairs", 0)) for _, e in shards)
        if expected is not None:
            expected.update(shards)
        return [path for path, _ in shards]

    train = from_manifest(train_shards, "train")
    train_urls: str | list[str] = train if train is not None else train_shards
    val_urls: str | list[str] | None
    if val_shards is not None:
        val = from_manifest(val_shards, "val")
        val_urls = val if val is not None else val_shards
    elif train is not None:
        val = from_manifest(train_shards, "val")
        val_urls = val or None
    else:
        val_urls = None
    return train_urls, val_urls, counts


# "pipe:", "http:", "s3:", "file:"...: a scheme of two letters or more (not a drive letter).
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def _manifest_shards(spec: str, split: str | None) -> list[tuple[str, dict]] | None:
    """``(absolute path, entry)`` of the manifest's shards (of one split, or all) when ``spec`` is a
    local build directory; ``None`` when it is a URL, a file or a brace pattern for WebDataset."""
    path = Path(spec)
    if "://" in spec or _URL_SCHEME.match(spec) or not path.is_dir():
        return None
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path} is a directory without manifest.json")
    manifest = load_manifest(path)
    entries = manifest.get("shards", []) if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise ManifestError(f"{path / 'manifest.json'}: 'shards' is not a list")
    return [(_manifest_shard_path(path, e), e) for e in entries if split is None or (isinstance(e, dict) and e.get("split") == split)]


def missing_shards(spec: str, flag: str) -> MissingShardsError | None:
    """The error for a local shard spec (directory, ``.tar``, brace pattern, ``::`` list) naming paths
    that do not exist yet - with the command that builds them - or ``None`` (URLs are not checked)."""
    if "://" in spec or spec.startswith("pipe:"):
        return None
    missing = [u for u in wds.shardlists.expand_urls(spec) if not Path(u).exists()]
    if not missing:
        return None
    first = Path(missing[0])
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    out = first if first.suffix != ".tar" else first.parent
    how = f"build them with `vpa-shard build INPUT... --out {out}`"
    if out.name == "shards":  # the layout `vpa-shard demo DIR` writes (DIR/shards)
        how += f", or the demo set with `vpa-shard demo {out.parent} --num-images 720 --val-fraction 0.2` (`vpa demo` builds and trains it)"
    return MissingShardsError(f"{flag}: {first}{more} does not exist (no shards built there yet); {how}")


def _manifest_shard_path(directory: Path, entry: Any) -> str:
    """Absolute path of one manifest shard. The name must be a plain relative path inside the build
    directory: a URL or ``pipe:`` command (WebDataset would run it), an absolute path, ``..`` or
    ``-`` (stdin) in a data file is refused, and the absolute result can never be read as a URL."""
    where = directory / "manifest.json"
    name = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: shard entry {str(entry)[:200]!r} has no 'path'")
    parts = PurePosixPath(name).parts
    if _URL_SCHEME.match(name) or "://" in name:
        raise ManifestError(f"{where}: shard path {name!r} is a URL or pipe; a manifest names files relative to it")
    if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name or name == "-":
        raise ManifestError(f"{where}: shard path {name!r} is not a file name relative to the manifest")
    return str(Path(os.path.abspath(directory)).joinpath(*parts))


def _test_urls(spec: str, expected: dict[str, dict] | None = None) -> str | list[str]:
    """``test_shards``: every shard (train and val split) of a manifest directory, else the spec as is."""
    shards = _manifest_shards(spec, None)
    if shards is None:
        return spec
    if expected is not None:
        expected.update(shards)
    return [path for path, _ in shards]


def _local_path(url: str) -> str | None:
    """The local file a WebDataset URL opens, or ``None`` for a pipe, a remote URL or stdin."""
    if url.startswith("file:"):
        return url2pathname(urlparse(url).path)
    if url == "-" or _URL_SCHEME.match(url):
        return None
    return url


def _tar_is_empty(path: str) -> bool:
    """Whether a tar archive holds no member (an empty file counts); other read errors raise."""
    try:
        with tarfile.open(path, "r:*") as tf:
            return tf.next() is None
    except tarfile.ReadError as exc:
        if os.path.getsize(path) == 0 or "empty" in str(exc):
            return True
        raise BadShardsError(f"shard {path} is not a readable tar archive: {exc}") from exc


def check_shards(urls: str | list[str], expected: dict[str, dict], verify: str = "size", what: str = "shards") -> None:
    """Check before reading that every local shard exists as a regular file and that not all are
    empty; a shard named by a manifest must have the manifest's size (``verify="size"``), and its
    sha256 too with ``verify="hash"`` (``"none"``: no manifest check).

    Raises:
        MissingShardsError / BadShardsError: naming the shard path and the reason.
    """
    paths = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    if not paths:
        raise BadShardsError(f"{what}: no shards to read (an empty manifest split?)")
    empty = []
    for url in paths:
        local = _local_path(url)
        if local is None:
            continue
        origin = f" (named by {Path(local).parent / 'manifest.json'})" if url in expected else ""
        try:
            st = os.stat(local)
        except FileNotFoundError:
            raise MissingShardsError(f"{what}: shard {local}{origin} does not exist") from None
        except OSError as exc:
            raise BadShardsError(f"{what}: shard {local}{origin} cannot be read: {exc}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise BadShardsError(f"{what}: shard {local}{origin} is not a regular file")
        entry = expected.get(url)
        if entry is not None and verify != "none":
            stale = "the manifest does not describe the shards on disk (a stale manifest or a changed shard: rebuild)"
            if "bytes" in entry and st.st_size != int(entry["bytes"]):
                raise BadShardsError(
                    f"{what}: shard {local} is {st.st_size} bytes, its manifest says {entry['bytes']}: {stale}"
                )
            if verify == "hash" and entry.get("sha256"):
                digest = hashlib.sha256()
                with open(local, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                if digest.hexdigest() != entry["sha256"]:
                    raise BadShardsError(
                        f"{what}: shard {local} has sha256 {digest.hexdigest()}, its manifest says {entry['sha256']}: {stale}"
                    )
        if _tar_is_empty(local):
            empty.append(local)
    if empty and len(empty) == len(paths):
        raise BadShardsError(f"{what}: every shard is empty (no samples): {', '.join(empty)}")
    for path in empty:
        log.warning("%s: shard %s is empty (no samples)", what, path)


class PreferenceDataModule(pl.LightningDataModule):
    """Preference groups from ``vpa-shard`` WebDataset shards, tokenised with the model's processor.

    Args:
        train_shards: Training shards: a directory with ``manifest.json`` (its
            ``train`` shards, and its ``val`` shards for validation unless
            ``val_shards`` is given), a local ``.tar`` path, brace notation
            (``/data/train-{000000..000009}.tar``), a ``::``-separated list, or
            any WebDataset URL (``pipe:aws s3 cp s3://b/x.tar -``, ``https://...``).
        val_shards: Validation (and default test/predict) shards, same forms;
            ``None`` takes them from the manifest of ``train_shards`` if any,
            else there is no validation.
        test_shards: Shards for ``test`` / ``predict`` (a manifest directory gives all its
            shards, train and val); ``None`` uses the validation shards.
        batch_size: Groups (images with all their responses) per batch; the
            number of sequences per batch is the sum of the groups' K.
        num_workers: DataLoader worker processes (decoding and tokenisation
            happen there). Shards are split across workers, so use at most as
            many workers as shards per node.
        shuffle_buffer: Size of the group shuffle buffer for training (0 = no
            shuffling); shard order is also shuffled per epoch.
        max_length: Maximum tokens per sequence (prompt + image tokens +
            response); responses are truncated to fit, groups whose prompt
            alone does not fit are skipped. ``None`` = no limit.
        seed: Seed of the shard and buffer shuffles (combined with epoch, rank and worker).
        groups_per_epoch: Training groups per epoch over all ranks, or ``None`` for one
            pass over the training shards (each shard read once per epoch; right for one
            device). Set it for multi-device training: shards are then drawn with
            replacement (WebDataset ``resampled``) and every rank and worker yields the
            same number of batches (``groups_per_epoch`` rounded up to a multiple of
            ``world_size x max(num_workers, 1) x batch_size``), so no rank waits for
            another at the end of an epoch, and the loader has a length (for the LR schedule).
            The resampled shard draws are seeded by (seed, epoch, rank, worker), so runs repeat.
        processor: The model's processor; ``None`` takes
            ``trainer.lightning_module.processor`` in :meth:`setup`.
        unpaired: Label each response desirable / undesirable for unpaired losses (KTO):
            ``threshold:X`` (mean score >= X is desirable, below undesirable; VLFeedback ratings
            1-5, MM-DPO's HelpSteer 0-4) or ``pairs`` (chosen and never rejected is desirable,
            rejected and never chosen undesirable). ``None``: no labels (KTO then uses ``pairs``).
        mismatched_pairs: Also batch each group's prompt with another group's responses (KTO's
            KL reference point); ``None`` = when the module's loss asks for it.
        max_image_pixels: Largest image (width x height) decoded; a larger one is skipped and
            counted from its header, before its pixels are decoded (the data core's
            limit; Pillow's ``Image.MAX_IMAGE_PIXELS`` default). ``None``: no limit.
        verify_shards: Before reading, shards named by a ``manifest.json`` are checked against it:
            ``size`` (default: each file exists with the manifest's byte size), ``hash`` (also its
            sha256; reads every shard once) or ``none``. A mismatch fails with the path and the
            reason. Every local shard must exist and be a regular file, and not all may be empty.
        chat_template: A Jinja chat template file for the processor (and its tokenizer), used for
            every prompt of the run (training, the report's generations, the export); for a
            checkpoint without one, or to override it. ``None``: the checkpoint's. A processor with
            no template fails at start-up, naming this option.
        max_skip_fraction: Largest share of training samples that may be skipped (malformed,
            untokenisable, ...) per epoch: above it the fit fails with the first reasons (checked
            as batches arrive once 64 samples were seen, and at the end of each epoch). ``1`` never fails.
        score_trailing_newline: Also score what the chat template writes after a response's
            end-of-turn token (``<|im_end|>`` then ``"\\n"``), as TRL does. Off by default: a response
            is scored up to and including its end-of-turn token, where generation stops.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        test_shards: str | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        max_length: int | None = 512,
        seed: int = 0,
        groups_per_epoch: int | None = None,
        processor: Any = None,
        unpaired: str | None = None,
        mismatched_pairs: bool | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        verify_shards: Literal["size", "hash", "none"] = "size",
        chat_template: str | None = None,
        max_skip_fraction: float = 0.05,
        score_trailing_newline: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise UsageError(f"--data.max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if chat_template is not None and not Path(chat_template).is_file():
            raise UsageError(f"--data.chat_template: no such file: {chat_template}")
        self.unpaired = parse_unpaired(unpaired)
        self.mismatched_pairs = mismatched_pairs
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0 or shuffle_buffer < 0:
            raise ValueError("num_workers and shuffle_buffer must be >= 0")
        if groups_per_epoch is not None and groups_per_epoch < 1:
            raise ValueError(f"groups_per_epoch must be >= 1 or None, got {groups_per_epoch}")
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"--data.max_image_pixels must be >= 1 or None, got {max_image_pixels}")
        if verify_shards not in ("size", "hash", "none"):
            raise ValueError(f"--data.verify_shards must be size, hash or none, got {verify_shards!r}")
        self.save_hyperparameters(ignore=["processor"])
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.test_shards = test_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.max_length = max_length
        self.seed = seed
        self.groups_per_epoch = groups_per_epoch
        self.processor = processor
        self.max_image_pixels = max_image_pixels
        self.verify_shards = verify_shards
        self.chat_template = chat_template
        self.max_skip_fraction = max_skip_fraction
        self.score_trailing_newline = score_trailing_newline
        self._skips = _SkipLog()
        self._expected: dict[str, dict] = {}  # manifest entry of each shard a manifest named
        self.train_urls, self.val_urls, self.counts = resolve_shards(train_shards, val_shards, self._expected)
        self.test_urls = _test_urls(test_shards, self._expected) if test_shards is not None else self.val_urls
        self._checked: set[str] = set()
        # resume state (see state_dict): the training examples the steps consumed so far, per stream
        self._consumed: dict[str, int] = {}
        self._consumed_epoch: int | None = None
        self._resume: dict[str, Any] | None = None
        self._pending_rng: dict[str, Any] | None = None

    # -- state -------------------------------------------------------------------------------
    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far in this process, by reason (``malformed_sample``, ``tokenisation``,
        ``shard``)."""
        return dict(self._skips.counts)

    @property
    def num_train_groups(self) -> int | None:
        """Training groups per epoch: ``groups_per_epoch`` if set, else from the manifest (``None`` without one)."""
        return self.groups_per_epoch or self.counts.get("train_samples")

    def setup(self, stage: str | None = None) -> None:
        # fail before anything else (e.g. the LR schedule, which needs the manifest's counts) when
        # the shards of this stage were never built
        train, val, test = ("--data.train_shards", self.train_shards), ("--data.val_shards", self.val_shards), ("--data.test_shards", self.test_shards)
        if stage in (None, "fit"):
            checks = [train, val]
        else:  # the first spec given is where this stage's shards come from
            order = [val, train] if stage == "validate" else [test, val, train]
            checks = [next(c for c in order if c[1] is not None)]
        for flag, spec in checks:
            error = missing_shards(spec, flag) if spec is not None else None
            if error is not None:
                raise error
        module = getattr(self.trainer, "lightning_module", None) if self._trainer_attached() else None
        if self.mismatched_pairs is None:
            loss = getattr(module, "loss_fn", None)
            self.mismatched_pairs = loss is not None and "kl_logps" in loss.required_inputs()
        if self.processor is None:
            processor = getattr(module, "processor", None)
            if processor is None:
                raise RuntimeError(
                    "PreferenceDataModule needs a processor: pass processor=... or use it with a "
                    "LightningModule that has a `processor` attribute (e.g. VisionDPOModule)"
                )
            self.processor = processor
        self._check_chat_template(module)

    def _check_chat_template(self, module: Any) -> None:
        """Install ``chat_template`` and render one prompt with the processor's template, so a
        model without one fails here, at start-up, instead of skipping every sample."""
        if self.chat_template is not None and not getattr(self, "_template_installed", False):
            text = Path(self.chat_template).read_text(encoding="utf-8")
            self.processor.chat_template = text
            if getattr(self.processor, "tokenizer", None) is not None:
                self.processor.tokenizer.chat_template = text
            self._template_installed = True
        try:
            # through the family: PaliGemma has a fixed prompt format and needs no template
            family_of(self.processor).prompt_text(self.processor, prompt_messages("?"))
        except Exception as exc:  # noqa: BLE001 - no template, or a broken one: both stop the run here
            model = getattr(module, "model_name_or_path", None)
            where = f"--data.chat_template {self.chat_template}" if self.chat_template else f"the processor of {model or 'the model'}"
            fix = (
                "fix the template file"
                if self.chat_template
                else "pass one with --data.chat_template PATH (a Jinja file, e.g. the chat_template of the "
                "family's instruct checkpoint) or use a checkpoint that ships one"
            )
            raise UsageError(
                f"{where} cannot render a prompt ({type(exc).__name__}: {exc}); without a chat template "
                f"every sample would be skipped: {fix}"
            ) from exc

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    # -- pipelines ---------------------------------------------------------------------------
    def _world_size(self) -> int:
        if self._trainer_attached():
            return max(int(getattr(self.trainer, "world_size", 1) or 1), 1)
        return 1

    def dataset(self, urls: str | list[str], train: bool) -> ExampleStream:
        """The stream of :class:`PreferenceExample` s for ``urls`` (see :class:`ExampleStream`)."""
        per_worker = None
        if train and self.groups_per_epoch is not None:
            workers = max(self.num_workers, 1)
            per_worker = math.ceil(self.groups_per_epoch / (self._world_size() * workers * self.batch_size))
            per_worker *= self.batch_size
        # resampled shards are drawn forever: a pass with nothing usable must fail, not spin
        decode = _DecodeStage(self._skips, self.max_image_pixels, _MAX_SKIPS_WITHOUT_EXAMPLE if per_worker else None)
        return ExampleStream(
            urls,
            decode,
            seed=self.seed,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            per_worker=per_worker,
            workers=max(self.num_workers, 1),
        )

    def _loader(self, urls: str | list[str] | None, train: bool, what: str) -> DataLoader:
        if urls is None:
            raise RuntimeError("no shards for this stage (set val_shards / test_shards)")
        if repr(urls) not in self._checked:  # before the first read; a missing shard must not pass as 0 steps
            check_shards(urls, self._expected, self.verify_shards, what)
            self._checked.add(repr(urls))
        if self.processor is None:
            self.setup()
        collate = GroupCollator(
            self.processor, self.max_length, self._skips, unpaired=self.unpaired, mismatched_pairs=bool(self.mismatched_pairs),
            score_trailing_newline=self.score_trailing_newline,
        )
        stream = self.dataset(urls, train)
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            # its own generator: starting a pass draws no number from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed),
        )
        if not train:
            return DataLoader(stream, persistent_workers=self.num_workers > 0, **kwargs)
        # workers start afresh each pass, so they see the pass's epoch (and resume position)
        loader = _TrainLoader(stream, **kwargs)
        loader.epoch_of = self._trainer_epoch
        loader.resume_of = lambda: self._resume
        loader.max_skip_fraction = self.max_skip_fraction
        return loader

    def _trainer_epoch(self) -> int | None:
        return int(self.trainer.current_epoch) if self._trainer_attached() else None

    # -- exact resume ------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training examples the steps consumed (the checkpointed position); after a
        resume, restore the RNG state of the checkpointed run right before its next step."""
        if self._trainer_attached() and self.trainer.training and isinstance(batch, dict):
            if self._pending_rng is not None:
                _set_rng_state(self._pending_rng)
                self._pending_rng = None
            for where, epoch, n in batch.get("position", ()):
                if epoch != self._consumed_epoch:
                    self._consumed, self._consumed_epoch = {}, epoch
                self._consumed[where] = max(n, self._consumed.get(where, 0))
        return batch

    def _fingerprint(self) -> dict[str, Any]:
        """What a resume must find unchanged: shard contents (manifest sha256s) and the stream layout."""
        shards: Any
        try:
            entries = _manifest_shards(self.train_shards, "train")
        except (OSError, ValueError):
            entries = None
        if entries is not None:
            shards = [[entry.get("path"), entry.get("sha256")] for _, entry in entries]
        else:
            shards = self.train_urls if isinstance(self.train_urls, list) else [self.train_urls]
        return {
            "shards": shards,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "groups_per_epoch": self.groups_per_epoch,
            "num_workers": self.num_workers,
            "world_size": self._world_size(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training position (examples consumed per rank and worker
        stream in the current epoch), the stream settings and shard hashes it depends on, and
        the RNG states (torch, numpy, Python) at the save."""
        consumed = dict(self._consumed)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, consumed)  # every rank saves through the same hook
            consumed = {k: v for part in gathered for k, v in part.items()}
        return {
            "version": 1,
            "epoch": self._consumed_epoch,
            "positions": consumed,
            "fingerprint": self._fingerprint(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where :meth:`state_dict` stopped; warn when that cannot be exact."""
        if state.get("version") != 1:
            log.warning("resume is not exact: the checkpoint has no data position (older vpa); the epoch restarts")
            return
        now, then = self._fingerprint(), state.get("fingerprint", {})
        changed = sorted(k for k in now if now[k] != then.get(k))
        if changed:
            log.warning(
                "resume is not exact: %s changed since the checkpoint (%s)",
                ", ".join(changed),
                "; ".join(f"{k}: {then.get(k)!r} -> {now[k]!r}" for k in changed if k != "shards") or "shard contents differ",
            )
        layout_same = not {"num_workers", "world_size"} & set(changed)
        if state.get("epoch") is not None and layout_same:
            self._resume = {"epoch": int(state["epoch"]), "positions": dict(state.get("positions", {}))}
            self._consumed, self._consumed_epoch = dict(self._resume["positions"]), self._resume["epoch"]
        self._pending_rng = state.get("rng")

    def _what(self, split: str) -> str:
        if split == "test" and self.test_shards is not None:
            return "--data.test_shards"
        return "--data.val_shards" if self.val_shards is not None else "--data.train_shards (its manifest's val split)"

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True, what="--data.train_shards")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_urls, train=False, what=self._what("val")) if self.val_urls is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_urls, train=False, what=self._what("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_urls, train=False, what=self._what("test"))
