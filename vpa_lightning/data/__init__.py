"""Data core: preference annotations to WebDataset shards (see :mod:`vpa_lightning.data.shards`)."""

from vpa_lightning.data.shards import (
    ConfigError,
    InputFileError,
    ManifestError,
    OutputError,
    RustPairsError,
    bradley_terry,
    build,
    inspect,
    merge,
    strategies,
)

__all__ = [
    "ConfigError",
    "InputFileError",
    "ManifestError",
    "OutputError",
    "RustPairsError",
    "bradley_terry",
    "build",
    "inspect",
    "merge",
    "strategies",
]
