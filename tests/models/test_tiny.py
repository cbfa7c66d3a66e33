"""Size options of the tiny models: ``build_tiny_vlm(..., image_size=, vision_hidden=)`` and ``tiny:llava?...`` specs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vpa_lightning.models.generation import encode_for_generation
from vpa_lightning.models.tiny import TINY_OPTIONS, build_tiny_vlm, parse_tiny_spec


def test_parse_tiny_spec():
    assert parse_tiny_spec("llava") == ("llava", {})
    assert parse_tiny_spec("llava?image_size=56&vision_hidden=64") == ("llava", {"image_size": 56, "vision_hidden": 64})
    for bad in ("llava?image_size", "llava?image_size=big", "llava?image_size=56&image_size=56"):
        with pytest.raises(ValueError):
            parse_tiny_spec(bad)


def test_default_equals_explicit_defaults():
    a, _ = build_tiny_vlm("llava", seed=1)
    b, _ = build_tiny_vlm("llava", seed=1, **TINY_OPTIONS["llava"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.to_dict() == b.config.to_dict()


def test_llava_image_size_and_width():
    model, processor = build_tiny_vlm("llava?image_size=56&vision_hidden=64")
    assert model.config.vision_config.image_size == 56 and model.config.vision_config.hidden_size == 64
    inputs = encode_for_generation(processor, [Image.new("RGB", (64, 64), (200, 30, 30))], ["What colour?"])
    assert tuple(inputs["pixel_values"].shape[-2:]) == (56, 56)
    image_token = model.config.image_token_index
    assert int((inputs["input_ids"] == image_token).sum()) == 16  # (56 / 14) ** 2
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    # keyword and spec give the same model
    same, _ = build_tiny_vlm("llava", image_size=56, vision_hidden=64)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl", "llava_next_video"])
def test_other_families_take_sizes(family):
    if family in ("qwen2_vl", "llava_next_video"):  # their processors need a video processor
        pytest.importorskip("torchvision")
    model, processor = build_tiny_vlm(family, image_size=84, vision_hidden=48)
    inputs = encode_for_generation(processor, [Image.new("RGB", (84, 84))], ["What is this?"])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl"])
def test_text_hidden(family):
    if family == "qwen2_vl":
        pytest.importorskip("torchvision")
    model, processor = build_tiny_vlm(f"{family}?text_hidden=64")
    assert model.config.text_config.hidden_size == 64
    size = model.config.vision_config.image_size if family == "llava" else 56
    inputs = encode_for_generation(processor, [Image.new("RGB", (size, size), (200, 30, 30))], ["What is this?"])
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert torch.isfinite(out.logits).all() and out.hidden_states[-1].shape[-1] == 64


@pytest.mark.parametrize(
    "spec",
    ["llava?image_size=30", "llava?vision_hidden=33", "llava?depth=3", "idefics3?image_size=42", "qwen2_vl?text_hidden=48"],
)
def test_bad_options(spec):
    with pytest.raises(ValueError):
        build_tiny_vlm(spec)


def test_conflicting_options():
    with pytest.raises(ValueError, match="twice"):
        build_tiny_vlm("llava?image_size=56", image_size=84)


def test_llava_vision_init_factor():
    base, _ = build_tiny_vlm("llava")
    smooth, _ = build_tiny_vlm("llava?vision_init_factor=1")
    assert base.config.vision_config.initializer_factor == 10.0
    assert smooth.config.vision_config.initializer_factor == 1.0
    w = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert smooth.state_dict()[w].std() < base.state_dict()[w].std() / 3
    with pytest.raises(ValueError, match="unknown"):
        build_tiny_vlm("idefics3?vision_init_factor=1")


def test_llava_next_video_frames_pool_to_an_even_patch_grid():
    """Its frames' patch grid is average-pooled with stride 2: image_size is a multiple of 2 x 14."""
    with pytest.raises(ValueError, match="multiple of 28"):
        build_tiny_vlm("llava_next_video?image_size=42")
