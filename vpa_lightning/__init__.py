"""vpa: align vision-language models with preference optimisation.

The data core (``vpa_lightning.data``) turns multi-aspect annotations into deduplicated,
Bradley-Terry-ranked preference pairs in WebDataset shards, through the Rust extension
``vpa_lightning.rust_pairs``. Importing this package has no side effects and imports no
heavy dependency; subpackages are imported on use.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

__all__ = ["PreferenceDataModule", "VisionDPOModule", "__version__"]

# Heavy classes are imported on first access (PEP 562), so ``import vpa_lightning``
# stays free of torch/lightning imports.
_LAZY = {
    "VisionDPOModule": "vpa_lightning.module",
    "PreferenceDataModule": "vpa_lightning.data.datamodule",
}

if TYPE_CHECKING:  # pragma: no cover
    from vpa_lightning.data.datamodule import PreferenceDataModule
    from vpa_lightning.module import VisionDPOModule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
