"""Kornia augmentations, presets, registry, seeding and corrupt_images (all on CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from vpa_lightning import augment as A

# Stochastic configurations (p < 1 or a random parameter) so that different seeds differ.
STOCHASTIC = {
    "diffusion_noise": lambda: A.DiffusionNoise(step=500),
    "random_resized_crop": lambda: A.RandomResizedCrop(scale=(0.2, 1.0)),
    "horizontal_flip": lambda: A.RandomHorizontalFlip(p=0.5),
    "color_jitter": lambda: A.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0),
    "grayscale": lambda: A.RandomGrayscale(p=0.5),
    "gaussian_blur": lambda: A.GaussianBlur(sigma=(0.1, 2.0), kernel_size=5, p=1.0),
    "gaussian_blur_auto_kernel": lambda: A.GaussianBlur(sigma=(0.1, 2.0), p=1.0),
    "rotation": lambda: A.RandomRotation(degrees=30.0),
    "posterize": lambda: A.RandomPosterize(bits=(1, 6)),
    "solarize": lambda: A.RandomSolarize(threshold=(0.2, 0.8), p=1.0),
    "moco_v2": A.moco_v2,
    "simclr": A.simclr,
    "byol": A.byol,
    "byol_view2": lambda: A.byol(view=2),
    "composed": lambda: A.Compose([A.ColorJitter(), A.DiffusionNoise(step=800)]),
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 3, 32, 32, generator=g)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_dtype_device(name, dtype, images):
    x = images.to(dtype)
    y = STOCHASTIC[name]()(x, seed=3)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_reproducible_under_seed_and_differs_across_seeds(name, images):
    aug = STOCHASTIC[name]()
    a = aug(images, seed=11)
    b = aug(images, seed=11)
    c = aug(images, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # A freshly built instance reproduces the same output too (no hidden per-instance state).
    assert torch.equal(STOCHASTIC[name]()(images, seed=11), a)


def test_seeded_call_restores_global_rng(images):
    with torch.random.fork_rng(devices=[]):  # keep this test's seeding out of other tests
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        A.moco_v2()(images, seed=99)
        assert torch.equal(torch.rand(3), expected)


def test_unseeded_call_uses_global_rng(images):
    aug = A.Compose([A.ColorJitter(), A.DiffusionNoise()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        a = aug(images)
        torch.manual_seed(7)
        b = aug(images)
    assert torch.equal(a, b)
    assert torch.equal(a, aug(images, seed=7))


def test_generator_gives_reproducible_streams(images):
    aug = A.simclr()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first = [aug(images, generator=g1) for _ in range(2)]
    second = [aug(images, generator=g2) for _ in range(2)]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], first[1])
    with pytest.raises(ValueError, match="generator"):
        aug(images, seed=1, generator=g1)


def test_operation_semantics(images):
    flipped = A.RandomHorizontalFlip(p=1.0)(images, seed=0)
    assert torch.allclose(flipped, images.flip(-1))
    gray = A.RandomGrayscale(p=1.0)(images, seed=0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    posterized = A.RandomPosterize(bits=2)(images, seed=0)
    assert posterized.unique().numel() <= 4
    identity = A.RandomRotation(degrees=0.0)(images, seed=0)
    assert torch.allclose(identity, images, atol=1e-5)
    cropped = A.RandomResizedCrop(size=(24, 20))(images, seed=0)
    assert cropped.shape == (16, 3, 24, 20)
    for aug in (A.ColorJitter(), A.RandomSolarize(p=1.0), A.moco_v2()):
        out = aug(images, seed=0)
        assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


def test_blur_kernel_follows_image_size():
    from vpa_lightning.augment.kornia_ops import default_blur_kernel

    assert default_blur_kernel(224, 224) == 23  # SimCLR/BYOL at 224 px
    assert default_blur_kernel(336, 400) == 35
    assert default_blur_kernel(8, 8) == 3
    blur = A.GaussianBlur()
    for side in (16, 40):
        assert blur(torch.rand(2, 3, side, side), seed=0).shape == (2, 3, side, side)


def test_presets_compose_published_parameters(images):
    moco = A.moco_v2()
    assert isinstance(moco, A.Compose)
    crop, jitter, gray, blur, flip = moco
    assert isinstance(crop, A.RandomResizedCrop) and crop.scale == (0.2, 1.0)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, jitter.p) == (
        0.4,
        0.4,
        0.4,
        0.1,
        0.8,
    )
    assert isinstance(gray, A.RandomGrayscale) and gray.p == 0.2
    assert isinstance(blur, A.GaussianBlur) and blur.sigma == (0.1, 2.0) and blur.p == 0.5
    assert isinstance(flip, A.RandomHorizontalFlip) and flip.p == 0.5

    sim = A.simclr()
    assert sim[0].scale == (0.08, 1.0)
    assert (sim[2].brightness, sim[2].hue, sim[2].p) == (0.8, 0.2, 0.8)

    v1, v2 = A.byol(view=1), A.byol(view=2)
    assert (v1[2].brightness, v1[2].contrast, v1[2].saturation, v1[2].hue) == (0.4, 0.4, 0.2, 0.1)
    assert v1[4].p == 1.0 and v2[4].p == 0.1
    assert not any(isinstance(a, A.RandomSolarize) for a in v1)
    assert isinstance(v2[5], A.RandomSolarize) and v2[5].p == 0.2 and v2[5].threshold == (0.5, 0.5)

    # Presets compose with each other and with diffusion noise, and resize when asked.
    chain = A.Compose([A.moco_v2(), A.DiffusionNoise(step=500)])
    assert len(chain.leaves()) == 6
    assert chain(images, seed=0).shape == images.shape
    assert A.moco_v2(size=24)(images, seed=0).shape == (16, 3, 24, 24)


def test_build_augmentation_from_yaml(images):
    config = yaml.safe_load(
        """
        single: diffusion_noise
        with_args: {name: diffusion_noise, step: 800}
        chain: [random_resized_crop, {name: color_jitter, p: 0.8}, moco_v2]
        nothing: null
        """
    )
    single = A.build_augmentation(config["single"])
    assert isinstance(single, A.DiffusionNoise) and single.step == 500
    assert A.build_augmentation(config["with_args"]).step == 800
    chain = A.build_augmentation(config["chain"])
    assert isinstance(chain, A.Compose) and len(chain) == 3 and chain[1].p == 0.8
    assert chain(images, seed=1).shape == images.shape
    none = A.build_augmentation(config["nothing"])
    assert torch.equal(none(images), images)
    module = A.RandomRotation()
    assert A.build_augmentation(module) is module
    assert set(A.AUGMENTATIONS) >= {"diffusion_noise", "moco_v2", "simclr", "byol", "posterize"}


@pytest.mark.parametrize(
    "spec,match",
    [
        ("does_not_exist", "does_not_exist"),
        ({"step": 3}, "name"),
        ({"name": "diffusion_noise", "stp": 3}, "stp"),
        (42, "augmentation"),
    ],
)
def test_build_augmentation_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        A.build_augmentation(spec)


@pytest.mark.parametrize(
    "factory,kwargs,arg",
    [
        (A.RandomResizedCrop, {"scale": (0.0, 1.0)}, "scale"),
        (A.RandomResizedCrop, {"scale": (0.9, 0.2)}, "scale"),
        (A.RandomResizedCrop, {"ratio": (0.0, 1.0)}, "ratio"),
        (A.RandomResizedCrop, {"size": 0}, "size"),
        (A.RandomResizedCrop, {"p": 1.5}, "p"),
        (A.RandomHorizontalFlip, {"p": -0.1}, "p"),
        (A.ColorJitter, {"brightness": -1.0}, "brightness"),
        (A.ColorJitter, {"contrast": -0.5}, "contrast"),
        (A.ColorJitter, {"saturation": float("nan")}, "saturation"),
        (A.ColorJitter, {"hue": 0.6}, "hue"),
        (A.RandomGrayscale, {"p": 2}, "p"),
        (A.GaussianBlur, {"sigma": (0.0, 1.0)}, "sigma"),
        (A.GaussianBlur, {"kernel_size": 4}, "kernel_size"),
        (A.RandomRotation, {"degrees": -5.0}, "degrees"),
        (A.RandomPosterize, {"bits": 0}, "bits"),
        (A.RandomPosterize, {"bits": (6, 2)}, "bits"),
        (A.RandomSolarize, {"threshold": 1.5}, "threshold"),
        (A.simclr, {"strength": 3.0}, "strength"),
        (A.byol, {"view": 3}, "view"),
        (A.Compose, {"augmentations": [torch.nn.Identity()]}, "augmentations"),
    ],
)
def test_bad_arguments_raise_value_error_naming_argument(factory, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        factory(**kwargs)


def test_bad_inputs_raise(images):
    aug = A.DiffusionNoise()
    with pytest.raises(ValueError, match="images"):
        aug(images[0])
    with pytest.raises(ValueError, match="images"):
        aug((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="seed"):
        aug(images, seed=-1)


def test_corrupt_images_matches_direct_call(images):
    before = images.clone()
    out = A.corrupt_images(images, "diffusion_noise", seed=4)
    assert torch.equal(out, A.DiffusionNoise()(images, seed=4))
    assert torch.equal(images, before)
    assert not out.requires_grad


def test_corrupt_images_with_normalisation(images):
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixel_values = (images - mean) / std
    kw = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}

    # Diffusion noise runs on the normalised tensor, as in SeVa.
    noisy = A.corrupt_images(pixel_values, "diffusion_noise", seed=2, **kw)
    assert torch.allclose(noisy, A.DiffusionNoise()(pixel_values, seed=2), atol=1e-6)

    # Colour jitter runs on [0, 1] pixels, then the result is renormalised.
    jittered = A.corrupt_images(pixel_values, "color_jitter", seed=2, **kw)
    expected = (A.ColorJitter()(images, seed=2) - mean) / std
    assert torch.allclose(jittered, expected, atol=1e-5)

    # Mixed chain: colour in pixel space, then noise in normalised space.
    mixed = A.corrupt_images(pixel_values, ["color_jitter", "diffusion_noise"], seed=2, **kw)
    assert mixed.shape == pixel_values.shape

    with pytest.raises(ValueError, match="std"):
        A.corrupt_images(pixel_values, "color_jitter", mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="std"):
        A.corrupt_images(pixel_values, "color_jitter", mean=[0.5] * 3, std=[0.0, 1.0, 1.0])


def test_jsonargparse_exposes_typed_arguments():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(A.DiffusionNoise, "noise")
    parser.add_function_arguments(A.moco_v2, "preset")
    cfg = parser.parse_args(["--noise.step", "800", "--preset.size", "224"])
    assert cfg.noise.step == 800 and cfg.noise.num_steps == 1000 and cfg.preset.size == 224
    noise = A.DiffusionNoise(**cfg.noise.as_dict())
    assert noise.step == 800

    # An ``Augmentation``-typed argument accepts class_path/init_args configs, Compose included.
    def model(augmentation: A.Augmentation | None = None):
        return augmentation

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(model, "model")
    config = {
        "model": {
            "augmentation": {
                "class_path": "vpa_lightning.augment.Compose",
                "init_args": {
                    "augmentations": [
                        {
                            "class_path": "vpa_lightning.augment.RandomRotation",
                            "init_args": {"degrees": 10.0},
                        },
                        {"class_path": "vpa_lightning.augment.DiffusionNoise", "init_args": {"step": 800}},
                    ]
                },
            }
        }
    }
    cfg = parser.parse_string(yaml.safe_dump(config))
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(cfg).model.augmentation
    assert isinstance(built, A.Compose)
    assert built[0].degrees == 10.0 and built[1].step == 800


def test_import_does_not_import_kornia():
    code = "import sys, vpa_lightning.augment; assert 'kornia' not in sys.modules, 'kornia imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(images):
    x = images.cuda()
    for name in ("diffusion_noise", "moco_v2", "posterize"):
        aug = A.build_augmentation(name)
        y = aug(x, seed=0)
        assert y.device == x.device and y.shape == x.shape
        assert torch.equal(y, aug(x, seed=0))


def test_modules_copy_pickle_and_have_no_state(images):
    import copy
    import pickle

    aug = A.Compose([A.moco_v2(), A.DiffusionNoise(), A.RandomPosterize()])
    expected = aug(images, seed=1)
    assert torch.equal(copy.deepcopy(aug)(images, seed=1), expected)
    assert torch.equal(pickle.loads(pickle.dumps(aug))(images, seed=1), expected)
    assert len(aug.state_dict()) == 0  # nothing lands in checkpoints
