"""models/compiled.py: every tiny family has transformer blocks to compile (--model.compile_layers), one per decoder
layer in its language model, outermost only. Compiling and training with them: tests/trainer/test_compile_layers.py."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from vpa_lightning.models.compiled import transformer_blocks  # noqa: E402
from vpa_lightning.models.tiny import TINY_FAMILIES  # noqa: E402


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_has_blocks(family):
    from vpa_lightning.models import build_tiny_vlm

    model, _ = build_tiny_vlm(family)
    blocks = transformer_blocks(model)
    decoder = model.get_decoder()
    in_decoder = [b for b in blocks if any(b is m for m in decoder.modules())]
    assert in_decoder and len(in_decoder) == model.config.get_text_config().num_hidden_layers
    # outermost only: no block inside another
    assert not any(a is not b and any(a is m for m in b.modules()) for a in blocks for b in blocks)
