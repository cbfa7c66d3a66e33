"""The contract every benchmark implements, shared by the rule-scored and the judge-scored ones.

A benchmark reads its local file into :class:`EvalItem` s (bad lines become :class:`Reject` s,
never exceptions), the runner generates one greedy answer per item with each model, and the
benchmark scores the answers. Results are plain JSON-able dicts of floats.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Benchmark", "EvalItem", "Reject"]


@dataclass
class EvalItem:
    """One generation request.

    Attributes:
        item_id: Unique within the benchmark file (``question_id``, or ``"<id>#rot<k>"`` for an
            MMBench rotation); keys caches and answer files.
        image: Path of the image (absolute, resolved against the image root); ``None`` for a video item.
        question: Full text prompt given to the model (options, answer-format hint included).
        meta: Whatever the benchmark needs to score the answer (label, category, options, ...).
        video: The item's video (an :class:`~vpa_lightning.eval.video.EvalVideo`, decoded by the runner a
            batch at a time), or ``None``.
    """

    item_id: str
    image: Path | None
    question: str
    meta: dict[str, Any] = field(default_factory=dict)
    video: Any = None


@dataclass
class Reject:
    """A benchmark line that could not be used: file, 1-based line (or entry index) and reason."""

    file: str
    line: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason}


class Benchmark(abc.ABC):
    """A local benchmark file plus its scoring rule.

    Subclasses set ``name`` (the registry key used in YAML, e.g. ``"pope"``) and implement
    :meth:`load` and :meth:`score`.
    """

    name: str = ""

    @abc.abstractmethod
    def load(self) -> tuple[list[EvalItem], list[Reject]]:
        """Read the benchmark file: usable items, and every unusable line with its reason."""

    @abc.abstractmethod
    def score(self, items: list[EvalItem], answers: list[str]) -> dict[str, float]:
        """Metrics (name -> value) of ``answers[i]`` to ``items[i]``."""
