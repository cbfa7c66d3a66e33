"""vpa: align vision-language models with preference optimisation.

The data core (``vpa_lightning.data``) turns multi-aspect annotations into deduplicated,
Bradley-Terry-ranked preference pairs in WebDataset shards, through the Rust extension
``vpa_lightning.rust_pairs``. Importing this package has no side effects and imports no
heavy dependency; subpackages are imported on use.
"""

__version__ = "0.1.0"
