"""The training extra installs what the supported processors need at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_extra() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    return {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in extra}


def test_train_extra_has_num2words_for_smolvlm():
    """SmolVLM's processor raises ImportError at construction without ``num2words``."""
    assert "num2words" in _train_extra()
    pytest.importorskip("transformers")
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    from vpa_lightning.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"])
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(), tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(), image_seq_len=4
    )
    assert processor.image_seq_len == 4
