"""PaliGemma: a prefix-LM trained without a chat template.

Its prompt format is fixed, as in the processor's own training path (``suffix=``): ``<image>`` x n,
BOS, the prompt, ``"\\n"`` (the processor adds BOS and the newline), then the response and EOS.
``token_type_ids`` mark the prefix (0, bidirectional) and the suffix (1, causal): responses are
suffix, so a later response token never changes an earlier one's log-prob. The processor's
``labels`` output is not a model input. Position ids count from 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Family


class PaliGemmaFamily(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    processor_classes = ("PaliGemmaProcessor",)
    unused_vision_modules = ("head",)  # SigLIP's attention pooling: the VLM takes its hidden states
    bidirectional_blocks = "prefix"
    response_fill = {"token_type_ids": 1}
    dropped_inputs = ("labels",)
    needs_chat_template = False
    first_position = 1

    def prompt_text(self, processor: Any, messages: Sequence[dict[str, Any]]) -> str:
        images, texts = 0, []
        for message in messages:
            content = message["content"]
            parts = []  # a message's text parts render back to back (a prompt cut at its images' places)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part.get("type") == "image":
                    images += 1
                elif part.get("type") == "text":
                    parts.append(part["text"])
            texts.append("".join(parts))
        if not images:
            raise ValueError("PaliGemma takes at least one image per prompt (its processor refuses text-only input)")
        return processor.image_token * images + " ".join(texts)

    def response_text(self, processor: Any, messages, prompt: str, response: str, score_trailing_newline: bool = False) -> str:
        return response + processor.tokenizer.eos_token

    def processor_kwargs(self, processor: Any, prompts: Sequence[str]) -> dict[str, Any]:
        return {}


FAMILY = PaliGemmaFamily()
