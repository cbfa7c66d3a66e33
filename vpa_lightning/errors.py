"""Typed errors of the trainer half; the ``vpa`` console script maps them to exit statuses.

``UsageError`` (a bad option or config value; the message names the flag) exits with status 2,
like an unknown flag; any other :class:`VpaError` (a run that cannot go on, e.g. too many skipped
samples) exits with status 1. Both print one ``vpa <command>: error: ...`` line, no traceback.
"""

from __future__ import annotations

__all__ = [
    "BadShardsError", "MissingShardsError", "NothingTrainedError", "TooManySkippedError", "UsageError",
    "VideoUnsupportedError", "VpaError",
]


class VpaError(Exception):
    """An error the command line reports as one message (exit status 1)."""


class UsageError(VpaError, ValueError):
    """A bad option or config value; the message names the flag (exit status 2)."""


class MissingShardsError(UsageError):
    """The shards a data option points at do not exist (not built yet); the message names the
    path and the command that creates it."""


class TooManySkippedError(VpaError, RuntimeError):
    """More than ``--data.max_skip_fraction`` of the samples were skipped; the message gives the first reasons."""


class BadShardsError(VpaError, ValueError):
    """Shards that exist but cannot be read as training data: not a regular file, not a tar archive,
    all empty, or not the files their manifest lists (size or sha256); the message names the path."""


class NothingTrainedError(VpaError, RuntimeError):
    """A fit (or an epoch of it) ran 0 training steps: no usable sample came from the data."""


class VideoUnsupportedError(UsageError):
    """The data has videos and the model's family takes none; the message names the families that do. Never a
    skipped sample: the run stops at the first such batch (or at start-up, from the first training sample)."""
