"""Model helpers: tiny offline VLMs for tests/demos and batched group log-probs."""

from .logps import GroupBatch, GroupLogps, PreferenceGroup, build_group_batch, group_logps, prompt_messages
from .tiny import TINY_FAMILIES, build_tiny_tokenizer, build_tiny_vlm

__all__ = [
    "TINY_FAMILIES",
    "GroupBatch",
    "GroupLogps",
    "PreferenceGroup",
    "build_group_batch",
    "build_tiny_tokenizer",
    "build_tiny_vlm",
    "group_logps",
    "prompt_messages",
]
