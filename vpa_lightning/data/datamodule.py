"""Lightning data module that streams preference groups from ``vpa-shard`` WebDataset shards.

One WebDataset sample is one *group*: its images (``{key}.0.jpg``,
``{key}.1.png``, ... as listed in the JSON's ``images``, in ``<image>``
placeholder order; format 1 shards have one ``{key}.png|jpg``), a prompt,
K >= 2 responses and the preference pairs among them (indices into the
responses). The data module

1. streams the shards with stock WebDataset stages (:class:`ExampleStream`:
   for training the shard order is shuffled per epoch, then split by node and
   by DataLoader worker; on several devices the samples themselves are split
   evenly, so every rank runs the same number of steps),
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

Videos
------
A sample's JSON may list ``videos`` (``{"kind": "file", "members": ["v0.mp4"], ...}`` or ``{"kind":
"frames", "members": ["v0.f0000.jpg", ...], ...}``, each with the ``offset`` of its ``<video>``
placeholder, like an image's). The data workers decode them (:mod:`vpa_lightning.data.video`: PyAV for
files, Pillow for frame lists), sampled by ``video_fps`` / ``video_max_frames`` and capped at
``video_max_pixels``; an undecodable, empty or oversized video skips its sample like an undecodable image
(``malformed_sample``). A prompt whose video tokens leave no room for a response within ``max_length`` is
skipped (``tokenisation``): video tokens, like image tokens, are never truncated. Videos train with the
families that take video (:meth:`~vpa_lightning.models.families.Family.takes_video`: Qwen2-VL,
Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video); any other stops at start-up when the first training sample has a video, else at the first
batch with one (:class:`~vpa_lightning.errors.VideoUnsupportedError`). Samples without ``videos`` are
read exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from vpa_lightning.data.collate import GroupCollator
from vpa_lightning.data.samples import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    PreferenceExample,
    SampleError,
    decode_sample,
    parse_unpaired,
    unpaired_labels,
)
from vpa_lightning.data.shardlist import (
    _local_path,
    _manifest_shards,
    _test_urls,
    check_shards,
    count_samples,
    missing_shards,
    resolve_shards,
)
from vpa_lightning.data.video import VideoSampling
from vpa_lightning.data.streams import (
    _MAX_SKIPS_WITHOUT_EXAMPLE,
    ExampleStream,
    _DecodeStage,
    _rng_state,
    _set_rng_state,
    _SkipLog,
    _TrainLoader,
    even_quota,
)
from vpa_lightning.errors import UsageError
from vpa_lightning.models.families import family_of
from vpa_lightning.models.logps import prompt_messages

# the public names of the data side, where they have always been importable from
__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "ExampleStream",
    "GroupCollator",
    "PreferenceDataModule",
    "PreferenceExample",
    "SampleError",
    "check_shards",
    "decode_sample",
    "missing_shards",
    "parse_unpaired",
    "resolve_shards",
    "unpaired_labels",
]

log = logging.getLogger(__name__)


def _first_sample_with_video(path: str) -> str | None:
    """The key of the first sample of a local shard when its JSON lists videos (``None``: it has none, or the
    shard cannot be read here: reading reports that later)."""
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(member).read(1 << 24))
                    return member.name.split(".", 1)[0] if isinstance(meta, dict) and meta.get("videos") else None
    except (OSError, tarfile.TarError, ValueError):
        return None
    return None


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
            happen there). On one device shards are split across workers, so use at most as
            many workers as shards; on several, samples are (any number of workers).
        shuffle_buffer: Size of the group shuffle buffer for training (0 = no
            shuffling); shard order is also shuffled per epoch.
        max_length: Maximum tokens per sequence (prompt + image tokens +
            response); responses are truncated to fit, groups whose prompt
            alone does not fit are skipped. ``None`` = no limit.
        seed: Seed of the shard and buffer shuffles (combined with epoch, rank and worker).
        groups_per_epoch: Training groups per epoch over all ranks, or ``None`` for one pass over the
            training shards. ``None`` on one device: each shard read once per epoch. ``None`` on several: the
            samples are split evenly across ranks and DataLoader workers (see :class:`ExampleStream`; every rank
            runs the same number of steps, each sample at most once per epoch, fewer than ``world_size x
            max(num_workers, 1) x batch_size`` left out), which needs the shards' sample counts (a manifest, or
            local ``.tar`` files). Set it for remote shards on several devices: shards are then drawn with
            replacement (WebDataset ``resampled``) and every rank and worker yields the same number of batches
            (``groups_per_epoch`` rounded up to a multiple of ``world_size x max(num_workers, 1) x batch_size``).
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
        video_fps: Frames per second sampled from a sample's videos (decoded with PyAV in the data
            workers; a frame list without its own ``fps`` counts as sampled at this rate already).
            ``None``: every frame, up to ``video_max_frames``.
        video_max_frames: Most frames of one video; a video with more (after ``video_fps``) gets this
            many, evenly spaced over its length. ``None``: no limit (then ``video_fps`` must be set).
            LLaVA-OneVision and LLaVA-NeXT-Video (a batch's videos as one tensor) get exactly this many frames
            per video, ``video_fps`` not used, frames repeated in a shorter clip.
        video_max_pixels: Most pixels (width x height) of a video frame: larger frames are scaled down
            as they are decoded, and the processor's own video size argument gets the limit (Qwen2-VL:
            ``size["longest_edge"]``; LLaVA-OneVision, LLaVA-NeXT-Video: the decoded frames only, their
            processors give every frame the checkpoint's fixed size). ``None``: the processor's setting (frames
            decoded at full size). Videos train with the families that take video (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision,
            LLaVA-NeXT-Video); with any other, the first video stops the run. A video that cannot be decoded, has no frame or frames over
            ``max_image_pixels`` is skipped and counted like an undecodable image.
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
        video_fps: float | None = 2.0,
        video_max_frames: int | None = 16,
        video_max_pixels: int | None = None,
    ) -> None:
        super().__init__()
        if video_fps is not None and not (isinstance(video_fps, (int, float)) and math.isfinite(video_fps) and video_fps > 0):
            raise UsageError(f"--data.video_fps must be a positive number of frames per second or null, got {video_fps!r}")
        if video_max_frames is not None and video_max_frames < 1:
            raise UsageError(f"--data.video_max_frames must be >= 1 or null, got {video_max_frames}")
        if video_fps is None and video_max_frames is None:
            raise UsageError("--data.video_fps and --data.video_max_frames are both null: set at least one (every frame "
                             "of every video would be decoded and trained)")
        if video_max_pixels is not None and video_max_pixels < 1:
            raise UsageError(f"--data.video_max_pixels must be >= 1 or null, got {video_max_pixels}")
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
        self.video_fps = None if video_fps is None else float(video_fps)
        self.video_max_frames = video_max_frames
        self.video_max_pixels = video_max_pixels
        self._skips = _SkipLog()
        self._expected: dict[str, dict] = {}  # manifest entry of each shard a manifest named
        self.train_urls, self.val_urls, self.counts = resolve_shards(train_shards, val_shards, self._expected)
        self.test_urls = _test_urls(test_shards, self._expected) if test_shards is not None else self.val_urls
        self._checked: set[str] = set()
        self._counted: dict[str, int] = {}  # samples of local shards without a manifest (the even split)
        # resume state (see state_dict): the training examples the steps consumed so far, per stream
        self._consumed: dict[str, int] = {}
        self._batches: dict[str, int] = {}  # training batches each rank consumed in the epoch
        self._finished_epoch: int | None = None  # the last epoch whose training stream ran out
        self._epoch_floor = 0  # resumed after a finished epoch: the pass to come is the next one
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
        if stage in (None, "fit"):
            self._check_video_family()

    @property
    def video_sampling(self) -> VideoSampling:
        """How the data workers sample videos (``--data.video_fps``, ``video_max_frames``, ``video_max_pixels``), as
        the model's family decodes them (LLaVA-OneVision, LLaVA-NeXT-Video: exactly ``video_max_frames`` each)."""
        sampling = VideoSampling(fps=self.video_fps, max_frames=self.video_max_frames, max_pixels=self.video_max_pixels,
                                 max_image_pixels=self.max_image_pixels)
        if getattr(self, "processor", None) is None:
            return sampling
        from vpa_lightning.models.families import family_of

        return family_of(self.processor).video_sampling(sampling)

    def _check_video_family(self) -> None:
        """At start-up: a model whose family takes no video, on shards whose first training sample has one, stops here
        (naming the families that take video) rather than at the first batch. Local shards only; later samples
        with videos stop the run at their batch (:class:`GroupCollator`)."""
        family = family_of(self.processor)
        if family.takes_video(self.processor):
            return
        urls = wds.shardlists.expand_urls(self.train_urls) if isinstance(self.train_urls, str) else list(self.train_urls or [])
        local = _local_path(urls[0]) if urls else None
        key = _first_sample_with_video(local) if local is not None else None
        if key is not None:
            family.check_video(self.processor, f"--data.train_shards: sample {key!r} of {local} has a video")

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
        """The stream of :class:`PreferenceExample` s for ``urls`` (see :class:`ExampleStream`). On several devices
        without ``groups_per_epoch`` the samples are split evenly across ranks and workers (the shards' sample
        counts from their manifest, or counted from local tar headers)."""
        workers = max(self.num_workers, 1)
        world = self._world_size()
        per_worker = counts = None
        if train and self.groups_per_epoch is not None:
            per_worker = math.ceil(self.groups_per_epoch / (world * workers * self.batch_size))
            per_worker *= self.batch_size
        elif world > 1:
            counts = self._sample_counts(urls)
            if counts is None and train:
                raise UsageError(
                    f"--data.train_shards: on {world} devices vpa splits the training samples evenly across ranks, which "
                    "needs each shard's sample count: give a vpa-shard build directory (its manifest.json) or local .tar "
                    "files, or, for remote shards, set --data.groups_per_epoch (shards drawn with replacement)"
                )
            if train and even_quota(sum(counts), world * workers, self.batch_size) == 0:
                raise UsageError(
                    f"--data.batch_size {self.batch_size}: {world} devices x {workers} DataLoader worker(s) need at least "
                    f"{world * workers * self.batch_size} training samples to give every rank a batch, and the shards hold "
                    f"{sum(counts)}; lower --data.batch_size or --data.num_workers"
                )
        # shards read with replacement or round and round: a pass with nothing usable must fail, not spin
        bounded = per_worker is not None or (train and counts is not None)
        decode = _DecodeStage(self._skips, self.max_image_pixels, _MAX_SKIPS_WITHOUT_EXAMPLE if bounded else None,
                              video_sampling=self.video_sampling)
        return ExampleStream(
            urls,
            decode,
            seed=self.seed,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            per_worker=per_worker,
            workers=workers,
            counts=counts,
            world=world,
            batch_size=self.batch_size,
        )

    def _sample_counts(self, urls: str | list[str]) -> list[int] | None:
        """Samples of each shard of ``urls``: the manifest's, else counted from a local tar's headers (once per
        run); ``None`` where a shard is remote (a URL or ``pipe:``)."""
        paths = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
        counts = []
        for url in paths:
            entry = self._expected.get(url)
            if isinstance(entry, dict) and isinstance(entry.get("samples"), int):
                counts.append(int(entry["samples"]))
                continue
            local = _local_path(url)
            if local is None:
                return None
            if local not in self._counted:
                self._counted[local] = count_samples(local)
            counts.append(self._counted[local])
        return counts

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
            score_trailing_newline=self.score_trailing_newline, video_max_pixels=self.video_max_pixels,
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
        loader.on_exhausted = self._epoch_exhausted
        loader.max_skip_fraction = self.max_skip_fraction
        return loader

    def _trainer_epoch(self) -> int | None:
        """The epoch of the pass about to start: the trainer's, or later after a resume from a checkpoint written as
        an epoch ended. Lightning creates the loader there while ``current_epoch`` still names the finished epoch,
        and never creates it again for the epoch it then runs: replaying the finished epoch's stream to its
        checkpointed end would give that epoch no batch (an epoch skipped in silence)."""
        if not self._trainer_attached():
            return None
        return max(int(self.trainer.current_epoch), self._epoch_floor)

    # -- exact resume ------------------------------------------------------------------------
    def _epoch_exhausted(self, epoch: int) -> None:
        self._finished_epoch = epoch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training examples the steps consumed per stream, and the batches per rank (the checkpointed
        position); after a resume, restore the RNG state of the checkpointed run right before its next step."""
        if self._trainer_attached() and self.trainer.training and isinstance(batch, dict):
            if self._pending_rng is not None:
                _set_rng_state(self._pending_rng)
                self._pending_rng = None
            for where, epoch, n in batch.get("position", ()):
                if epoch != self._consumed_epoch:
                    self._consumed, self._batches, self._consumed_epoch = {}, {}, epoch
                self._consumed[where] = max(n, self._consumed.get(where, 0))
            if batch.get("position"):
                rank = str(self.trainer.global_rank)
                self._batches[rank] = self._batches.get(rank, 0) + 1
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
        the RNG states (torch, numpy, Python) of every rank at the save (they differ: each rank's dropout drew for
        its own batches)."""
        consumed, batches = dict(self._consumed), dict(self._batches)
        rng = _rng_state()
        by_rank = {"0": rng}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            # every rank saves through the same hook; the file holds what rank 0 saw of all of them
            torch.distributed.all_gather_object(gathered, (consumed, batches, rng))
            consumed = {k: v for part, _, _ in gathered for k, v in part.items()}
            batches = {k: v for _, part, _ in gathered for k, v in part.items()}
            by_rank = {str(r): part for r, (_, _, part) in enumerate(gathered)}
        return {
            "version": 1,
            "epoch": self._consumed_epoch,
            "positions": consumed,
            "batches": batches,
            # written as the epoch ended (every stream ran out): a resume starts the next epoch, nothing to replay
            "finished": self._consumed_epoch is not None and self._finished_epoch == self._consumed_epoch,
            "fingerprint": self._fingerprint(),
            "rng": by_rank["0"],
            "rng_by_rank": by_rank,
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
        if state.get("finished") and state.get("epoch") is not None:
            self._epoch_floor = int(state["epoch"]) + 1
        elif state.get("epoch") is not None and layout_same:
            batches = {str(k): int(v) for k, v in state.get("batches", {}).items()}
            workers = max(self.num_workers, 1)
            self._resume = {"epoch": int(state["epoch"]), "positions": dict(state.get("positions", {})),
                            # whose turn it is among each rank's workers (see ExampleStream._pipeline)
                            "shift": {rank: n % workers for rank, n in batches.items()}}
            self._consumed, self._consumed_epoch = dict(self._resume["positions"]), self._resume["epoch"]
            self._batches = batches
        rank = str(self.trainer.global_rank) if self._trainer_attached() else "0"
        self._pending_rng = state.get("rng_by_rank", {}).get(rank, state.get("rng"))

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
