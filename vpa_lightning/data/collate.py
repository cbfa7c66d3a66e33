"""Collating :class:`~vpa_lightning.data.samples.PreferenceExample` s into the batch dict the training module
takes (see :mod:`vpa_lightning.data.datamodule` for its keys)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from vpa_lightning.data.samples import PreferenceExample, unpaired_labels
from vpa_lightning.data.streams import _SkipLog
from vpa_lightning.models.families import family_of
from vpa_lightning.models.logps import build_group_batch

__all__ = ["GroupCollator"]

log = logging.getLogger(__name__)


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
        video_max_pixels: Passed to :func:`build_group_batch`.

    A batch with a video for a family that takes none raises
    :class:`~vpa_lightning.errors.VideoUnsupportedError` (the run stops; it is never a skipped sample).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        skips: _SkipLog | None = None,
        unpaired: tuple[str, float] | None = None,
        mismatched_pairs: bool = False,
        score_trailing_newline: bool = False,
        video_max_pixels: int | None = None,
    ) -> None:
        self.processor = processor
        self.video_max_pixels = video_max_pixels
        self.max_length = max_length
        self.score_trailing_newline = score_trailing_newline
        self.skips = skips if skips is not None else _SkipLog()
        self.unpaired = unpaired
        self.mismatched_pairs = mismatched_pairs

    def __call__(self, examples: Sequence[PreferenceExample]) -> dict[str, Any]:
        examples = list(examples)
        with_video = next((e for e in examples if e.group.videos), None)
        if with_video is not None:  # the model, not the sample, is wrong: stop instead of skipping every video
            family_of(self.processor).check_video(self.processor, f"sample {with_video.key!r} has a video")
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
            self.processor, groups, max_length=self.max_length, score_trailing_newline=self.score_trailing_newline,
            video_max_pixels=self.video_max_pixels,
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
