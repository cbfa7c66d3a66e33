"""Streams of :class:`~vpa_lightning.data.samples.PreferenceExample` s over shards: the WebDataset pipeline of one
pass (shard order, the split across ranks and DataLoader workers, decoding with skips, the buffer shuffle), the
training loader that sets each pass's epoch and resume position, and the skip-share watch."""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from vpa_lightning.data.samples import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PreferenceExample,
    SampleError,
    decode_sample,
)
from vpa_lightning.errors import TooManySkippedError, VpaError

__all__ = ["ExampleStream", "even_quota"]

log = logging.getLogger(__name__)


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
        self, skips: _SkipLog, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, max_skips_without_example: int | None = None,
        video_sampling: Any = None,
    ) -> None:
        self.skips = skips
        self.max_image_pixels = max_image_pixels
        self.max_skips_without_example = max_skips_without_example
        self.video_sampling = video_sampling  # a VideoSampling (None: its defaults)

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[PreferenceExample]:
        good, bad = 0, 0
        for sample in src:
            key = str(sample.get("__key__", "?"))
            what = f"sample {key!r} ({sample.get('__url__', '?')})"
            try:
                example = decode_sample(sample, self.max_image_pixels, self.video_sampling)
            except VpaError:  # not the sample's fault (e.g. no video decoder installed): every sample would fail
                raise
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

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int, worker: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank, self.worker = bufsize, seed, epoch, rank, worker

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{self.worker}")
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


def even_quota(total: int, streams: int, batch_size: int) -> int:
    """Training examples each of ``streams`` (ranks x DataLoader workers) yields per epoch under the even split:
    the most whole batches every stream can fill from ``total`` samples, so every rank runs the same number of
    steps; the remainder, fewer than ``streams x batch_size`` samples, sits out the epoch."""
    return total // (streams * batch_size) * batch_size


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

    **Even split** (``counts``: the samples of each shard, given for several ranks): the pass's samples, in the
    (seed, epoch) shard order, are one sequence, and stream ``s = rank x workers + worker`` of ``S`` reads its own
    contiguous range of it (only the shards that overlap the range are opened; a shard the range starts inside is
    read from its start, the samples before the range are parsed and passed over, not decoded). Training: every
    stream yields exactly :func:`even_quota` examples, a whole number of batches, so every rank runs the same number
    of steps and the ranks' samples are disjoint; a sample skipped as malformed is made up from the samples after
    the range (wrapping round), the one case where two streams may share a sample. Evaluation: the ranges split
    the samples as evenly as they go, each sample exactly once, none left out.
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
        counts: list[int] | None = None,
        world: int = 1,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        self.urls = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else list(urls)
        self.decode, self.seed, self.train, self.shuffle_buffer = decode, seed, train, shuffle_buffer
        self.per_worker, self.workers = per_worker, workers
        if counts is not None and len(counts) != len(self.urls):
            raise ValueError(f"{len(counts)} sample counts for {len(self.urls)} shards")
        self.counts = None if per_worker is not None else counts
        self.world, self.batch_size = world, batch_size
        self.quota = even_quota(sum(counts), world * workers, batch_size) if self.counts is not None and train else None
        self.epoch = 0
        self.resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        if self.per_worker is not None:
            return self.per_worker * self.workers
        if self.quota is not None:
            return self.quota * self.workers
        raise TypeError("a pass over the shards has no length known in advance")

    def _order(self) -> list[int]:
        """Shard indices in the pass's order: shuffled by (seed, epoch) for training, the same on every rank."""
        order = list(range(len(self.urls)))
        if self.train:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order

    def _range(self, stream: int) -> tuple[int, int]:
        """``[start, end)`` of stream ``stream``'s samples in the pass's sequence."""
        streams = self.world * self.workers
        if self.quota is not None:
            return stream * self.quota, (stream + 1) * self.quota
        total = sum(self.counts)
        return total * stream // streams, total * (stream + 1) // streams

    def _raw_from(self, order: list[int], start: int, end: int | None) -> Iterator[dict[str, Any]]:
        """Raw samples of the pass's sequence from position ``start`` to ``end`` (``None``: on and on, wrapping
        round: a training stream stops once it has its quota)."""
        read = wds.tarfile_to_samples(handler=self.decode.skips.shard_error)
        total = sum(self.counts)
        if total == 0:
            return
        position = start % total
        while end is None or position < end:
            offset = position % total
            first = 0  # the sequence position of this shard's first sample
            for index in order:
                if offset < first + self.counts[index]:
                    break
                first += self.counts[index]
            taken = 0
            for sample in itertools.islice(read(iter([{"url": self.urls[index]}])), offset - first, None):
                if end is not None and position + taken >= end:
                    return
                taken += 1
                yield sample
            # the shard may hold fewer samples than counted (a truncated tar): go on with the next one
            position += max(first + self.counts[index] - offset, 1)

    def _pipeline(self) -> tuple[Iterator[PreferenceExample], str]:
        rank, world, physical, workers = wds.utils.pytorch_worker_info()
        # A DataLoader takes batches from its workers in turn, always starting with worker 0. A pass resumed after
        # b batches must start with the stream whose turn it was: worker w reads stream (w + b) mod workers.
        resume = self.resume if self.resume and self.resume.get("epoch") == self.epoch else {}
        worker = (physical + int(resume.get("shift", {}).get(str(rank), 0))) % max(workers, 1)
        where = f"{rank}/{worker}"
        examples: Iterator[PreferenceExample]
        if self.counts is not None:  # the even split (several ranks)
            start, end = self._range(rank * self.workers + worker)
            examples = self.decode(self._raw_from(self._order(), start, None if self.quota is not None else end))
            if self.quota is not None:
                examples = itertools.islice(examples, self.quota)
        else:
            if self.per_worker is not None:
                shards = wds.ResampledShards(self.urls, seed=self.seed, deterministic=True, empty_check=False,
                                             worker_seed=lambda: rank * 1000 + worker)  # as WebDataset seeds a worker
                shards.epoch = self.epoch - 1  # it counts passes itself: start it at this one
                source: Any = shards
            else:  # each rank, then each of its workers, its share of the pass's shard order
                urls = [self.urls[i] for i in self._order()][rank::max(world, 1)][worker::max(workers, 1)]
                source = wds.SimpleShardList(urls)
            examples = iter(wds.DataPipeline(source, wds.tarfile_to_samples(handler=self.decode.skips.shard_error), self.decode))
            if self.per_worker is not None:
                examples = itertools.islice(examples, self.per_worker)
        if self.train and self.shuffle_buffer > 0:
            examples = _ShuffleStage(self.shuffle_buffer, self.seed, self.epoch, rank, worker)(examples)
        return examples, where

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
    on_exhausted: Any = None  # called with the epoch once its batches ran out
    max_skip_fraction: float | None = None
    passes = 0

    def __iter__(self):
        epoch = self.epoch_of() if self.epoch_of is not None else None
        self.dataset.epoch = self.passes if epoch is None else epoch
        if self.resume_of is not None:
            self.dataset.resume = self.resume_of()
        self.passes += 1
        batches = super().__iter__()
        if epoch is None:
            return batches  # no trainer: plain iteration never fails on skips
        if self.max_skip_fraction is not None and self.max_skip_fraction < 1:
            batches = _watch_skips(batches, self.max_skip_fraction, epoch)
        return self._until_exhausted(batches, epoch)

    def _until_exhausted(self, batches: Iterator[dict[str, Any]], epoch: int) -> Iterator[dict[str, Any]]:
        yield from batches
        if self.on_exhausted is not None:
            self.on_exhausted(epoch)


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
