"""Data core: preference annotations to WebDataset shards (see :mod:`vpa_lightning.data.shards`)."""

from vpa_lightning.data.shards import *  # noqa: F403 - the package re-exports the shard API
from vpa_lightning.data.shards import __all__  # noqa: F401
