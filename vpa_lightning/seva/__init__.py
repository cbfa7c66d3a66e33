"""SeVa (arXiv 2404.10501): self-generated preference pairs and generate -> DPO rounds.

* :mod:`vpa_lightning.seva.generate` - :func:`generate_pairs` (answers on the original image =
  chosen, on an augmented one = rejected, written as ``vpa-shard`` shards) and :func:`read_prompts`;
* :mod:`vpa_lightning.seva.rounds` - :func:`rounds` (generate, train with ``vpa fit``, export, repeat);
* :mod:`vpa_lightning.seva.cli` - ``vpa seva generate|rounds``; ``python -m vpa_lightning.seva``
  is ``vpa seva generate``.

Imports go one way: ``cli`` -> ``rounds`` -> ``generate``. Names are loaded on first use, so
importing the package imports no torch.
"""

from typing import Any

__all__ = ["generate_pairs", "main", "read_prompts", "rounds"]

_LAZY = {
    "generate_pairs": "vpa_lightning.seva.generate",
    "read_prompts": "vpa_lightning.seva.generate",
    "rounds": "vpa_lightning.seva.rounds",
    "main": "vpa_lightning.seva.cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
