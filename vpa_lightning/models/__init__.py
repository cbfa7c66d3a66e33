"""Model helpers: loading (``loading``), LoRA targets (``lora``), per-family quirks (``families``),
tiny offline VLMs for tests/demos (``tiny``), batched group log-probs (``logps``) and generation."""

from .families import Family, family_of
from .loading import TINY_PREFIX, load_vlm
from .logps import GroupBatch, GroupLogps, PreferenceGroup, build_group_batch, group_logps, prompt_messages
from .lora import apply_lora, default_lora_targets, language_and_vision_modules
from .tiny import TINY_FAMILIES, build_tiny_tokenizer, build_tiny_vlm

__all__ = [
    "TINY_FAMILIES",
    "TINY_PREFIX",
    "Family",
    "GroupBatch",
    "GroupLogps",
    "PreferenceGroup",
    "apply_lora",
    "build_group_batch",
    "build_tiny_tokenizer",
    "build_tiny_vlm",
    "default_lora_targets",
    "family_of",
    "group_logps",
    "language_and_vision_modules",
    "load_vlm",
    "prompt_messages",
]
