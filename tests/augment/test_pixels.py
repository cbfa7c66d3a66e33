"""corrupt_pixel_values on every processor layout: LLaVA [B,C,H,W], Idefics3 crops, Qwen2-VL patches."""

from __future__ import annotations

import pytest
import torch

from vpa_lightning.augment.pixels import corrupt_pixel_values, patchify_qwen2_vl, unpatchify_qwen2_vl
from vpa_lightning.models.generation import encode_for_generation
from vpa_lightning.models.tiny import build_tiny_vlm

QUESTIONS = ["what is it?", "which colour?", "a longer question about the picture?"]


@pytest.fixture(scope="module")
def pil_images():
    from PIL import Image

    return [Image.new("RGB", (60 + 8 * i, 40 + 4 * i), (30 * i, 200 - 40 * i, 50)) for i in range(3)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_only_pixels_change_and_seed_reproduces(family, pil_images):
    _, processor = build_tiny_vlm(family)
    inputs = encode_for_generation(processor, pil_images, QUESTIONS)
    noisy = corrupt_pixel_values(inputs, processor, "diffusion_noise", seed=3)
    for key, value in inputs.items():
        if key == "pixel_values":
            assert noisy[key].shape == value.shape and noisy[key].dtype == value.dtype
            assert (noisy[key] - value).abs().mean() > 0.1
        else:  # prompt, masks and image geometry identical: the image is the only difference
            assert torch.equal(noisy[key], value), key
    again = corrupt_pixel_values(inputs, processor, "diffusion_noise", seed=3)
    assert torch.equal(again["pixel_values"], noisy["pixel_values"])
    other = corrupt_pixel_values(inputs, processor, "diffusion_noise", seed=4)
    assert not torch.equal(other["pixel_values"], noisy["pixel_values"])
    assert torch.equal(corrupt_pixel_values(inputs, processor, "none", seed=0)["pixel_values"], inputs["pixel_values"])


def test_qwen2_vl_unpatchify_inverts_the_processor(pil_images):
    from PIL import Image

    _, processor = build_tiny_vlm("qwen2_vl")
    ip = processor.image_processor
    geo = {"patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size}
    im = pil_images[1]
    inputs = processor.image_processor(images=[im], return_tensors="pt")
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    image = unpatchify_qwen2_vl(inputs["pixel_values"], gh, gw, **geo)
    assert image.shape == (3, gh * ip.patch_size, gw * ip.patch_size)
    assert torch.equal(patchify_qwen2_vl(image, **geo), inputs["pixel_values"])
    # and it is the image: the processor's own normalised resize of the picture
    resized = im.resize((gw * ip.patch_size, gh * ip.patch_size), Image.BICUBIC)
    import numpy as np

    ref = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 255.0
    ref = (ref - torch.tensor(ip.image_mean)[:, None, None]) / torch.tensor(ip.image_std)[:, None, None]
    assert (image - ref).abs().mean() < 0.05


def test_qwen2_vl_horizontal_flip_flips_each_image(pil_images):
    from vpa_lightning.augment import RandomHorizontalFlip

    _, processor = build_tiny_vlm("qwen2_vl")
    ip = processor.image_processor
    geo = {"patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size}
    inputs = encode_for_generation(processor, pil_images, QUESTIONS)
    flipped = corrupt_pixel_values(inputs, processor, RandomHorizontalFlip(p=1.0), seed=0)["pixel_values"]
    start = 0
    for _, gh, gw in inputs["image_grid_thw"].tolist():
        n = gh * gw
        a = unpatchify_qwen2_vl(inputs["pixel_values"][start : start + n], gh, gw, **geo)
        b = unpatchify_qwen2_vl(flipped[start : start + n], gh, gw, **geo)
        assert torch.allclose(b, a.flip(-1), atol=1e-5)
        start += n


def test_idefics3_padding_images_stay_zero():
    _, processor = build_tiny_vlm("idefics3")
    pv = torch.randn(2, 3, 3, 16, 16)
    pv[0, 2] = 0  # padding image of a sample with fewer crops
    pv[1, 1:] = 0
    out = corrupt_pixel_values({"pixel_values": pv}, processor, "diffusion_noise", seed=0)["pixel_values"]
    assert torch.equal(out[0, 2], pv[0, 2]) and torch.equal(out[1, 1:], pv[1, 1:])
    assert (out[0, :2] - pv[0, :2]).abs().mean() > 0.1 and (out[1, 0] - pv[1, 0]).abs().mean() > 0.1


def test_unknown_layout_is_a_clear_error():
    _, processor = build_tiny_vlm("llava")
    with pytest.raises(ValueError, match="cannot corrupt pixel_values of shape"):
        corrupt_pixel_values({"pixel_values": torch.zeros(3, 4)}, processor, "diffusion_noise", seed=0)
