"""Corrupt the images inside a processor's output, whatever layout its ``pixel_values`` have.

SeVa's rejected answers and mDPO's image-conditional term both need the *same* prompt with a
corrupted image. Corrupting the processor output (instead of re-running the processor on a
corrupted PIL image) keeps every text input byte-identical - the image-token count, the prompt,
``image_grid_thw`` - so the image is the only difference, and it is how SeVa applies diffusion
noise (to the normalised tensor the vision tower sees).

Layouts handled (chosen from the inputs, see :func:`corrupt_pixel_values`):

* ``[B, C, H, W]`` - LLaVA-1.5, Gemma 3, most single-image processors;
* ``[B, N, C, H, W]`` - Idefics3 / SmolVLM crops; all-zero padding images are left untouched
  (the model drops them by that test, so noise there would change the image count);
* flat patches ``[sum(t*h*w), C*T*p*p]`` with ``image_grid_thw`` - Qwen2-VL / Qwen2.5-VL: each
  image is unpatchified to ``[C, H, W]``, corrupted, and patchified back.

Videos (``pixel_values_videos``): every frame of a clip gets the **same** corruption (the same random
parameters: crop, flip, colour factors, even the same noise pattern), so the clip stays one coherent
video and only its content is corrupted, not its motion (:func:`corrupt_clip`: each frame is corrupted
with the clip's seed). Layouts: Qwen2-VL / Qwen2.5-VL flat patches with ``video_grid_thw`` (each video
unpatchified to its ``grid_t x temporal_patch_size`` frames and back), LLaVA-OneVision's and
LLaVA-NeXT-Video's ``[videos, frames, C, H, W]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import AugmentationSpec, corrupt_images

__all__ = [
    "corrupt_clip", "corrupt_pixel_values", "patchify_qwen2_vl", "patchify_qwen2_vl_video", "unpatchify_qwen2_vl",
    "unpatchify_qwen2_vl_video",
]


def _normalisation(processor: Any) -> tuple[Any, Any]:
    ip = getattr(processor, "image_processor", processor)
    mean = getattr(ip, "image_mean", None)
    std = getattr(ip, "image_std", None)
    if mean is None or std is None or not getattr(ip, "do_normalize", True):
        return None, None
    return mean, std


def unpatchify_qwen2_vl(patches: Tensor, grid_h: int, grid_w: int, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> Tensor:
    """``[grid_h*grid_w, C*T*p*p]`` patches of ONE image (``grid_t == 1``) -> ``[C, grid_h*p, grid_w*p]``.

    Inverse of the Qwen2-VL image processor's patchify: rows are ordered
    ``(h/merge, w/merge, merge, merge)``, features ``(C, T, p, p)``; the ``T`` temporal copies of
    a still image are equal, so the first is taken.
    """
    p, m, t = patch_size, merge_size, temporal_patch_size
    c = patches.shape[-1] // (t * p * p)
    x = patches.reshape(grid_h // m, grid_w // m, m, m, c, t, p, p)[:, :, :, :, :, 0]
    # (h/m, w/m, m, m, C, p, p) -> (C, h/m, m, p, w/m, m, p)
    x = x.permute(4, 0, 2, 5, 1, 3, 6)
    return x.reshape(c, grid_h * p, grid_w * p)


def patchify_qwen2_vl(image: Tensor, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> Tensor:
    """``[C, H, W]`` -> ``[(H/p)*(W/p), C*T*p*p]``, the Qwen2-VL image processor's layout."""
    p, m, t = patch_size, merge_size, temporal_patch_size
    c, h, w = image.shape
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
    return x.reshape(gh * gw, c * t * p * p)


def unpatchify_qwen2_vl_video(patches: Tensor, grid_t: int, grid_h: int, grid_w: int, *, patch_size: int, merge_size: int,
                              temporal_patch_size: int) -> Tensor:
    """``[grid_t*grid_h*grid_w, C*T*p*p]`` patches of ONE video -> its ``[grid_t*T, C, grid_h*p, grid_w*p]`` frames.

    Inverse of the Qwen2-VL video processor's patchify: rows ``(t, h/merge, w/merge, merge, merge)``, features
    ``(C, T, p, p)`` with ``T`` consecutive frames per temporal patch."""
    p, m, t = patch_size, merge_size, temporal_patch_size
    c = patches.shape[-1] // (t * p * p)
    x = patches.reshape(grid_t, grid_h // m, grid_w // m, m, m, c, t, p, p)
    # (gt, h/m, w/m, m, m, C, T, p, p) -> (gt, T, C, h/m, m, p, w/m, m, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(grid_t * t, c, grid_h * p, grid_w * p)


def patchify_qwen2_vl_video(frames: Tensor, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> Tensor:
    """``[gt*T, C, H, W]`` frames -> ``[gt*(H/p)*(W/p), C*T*p*p]``, the Qwen2-VL video processor's layout."""
    p, m, t = patch_size, merge_size, temporal_patch_size
    n, c, h, w = frames.shape
    gt, gh, gw = n // t, h // p, w // p
    x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * t * p * p)


def corrupt_clip(frames: Tensor, augmentation: AugmentationSpec, *, seed: int, mean: Any = None, std: Any = None) -> Tensor:
    """The ``[T, C, H, W]`` frames of one clip, each corrupted with the same random parameters (each frame is its
    own batch of one under the same ``seed``, so a crop, a flip, colour factors and noise are drawn identically for
    every frame). ``mean`` / ``std``: the frames' normalisation, as :func:`~vpa_lightning.augment.corrupt_images`."""
    if frames.dim() != 4:
        raise ValueError(f"a clip's frames must be [T, C, H, W], got {tuple(frames.shape)}")
    return torch.cat([corrupt_images(frame.unsqueeze(0).float(), augmentation, seed=seed, mean=mean, std=std)
                      for frame in frames]).to(frames.dtype)


def _corrupt_videos(inputs: dict[str, Any], processor: Any, aug: AugmentationSpec, seed: int) -> Tensor:
    """``pixel_values_videos`` with every clip corrupted by :func:`corrupt_clip` (video ``i`` with ``seed + i``)."""
    pv = inputs["pixel_values_videos"]
    vp = getattr(processor, "video_processor", None) or getattr(processor, "image_processor", processor)
    mean, std = _normalisation(vp)
    grid = inputs.get("video_grid_thw")
    if grid is None:
        if pv.dim() != 5:
            raise ValueError(f"cannot corrupt pixel_values_videos of shape {tuple(pv.shape)} (no video_grid_thw)")
        return torch.stack([corrupt_clip(clip, aug, seed=seed + i, mean=mean, std=std) for i, clip in enumerate(pv)])
    geo = {k: int(getattr(vp, k)) for k in ("patch_size", "merge_size", "temporal_patch_size")}
    out, start = [], 0
    for i, (gt, gh, gw) in enumerate(grid.tolist()):
        n = gt * gh * gw
        frames = unpatchify_qwen2_vl_video(pv[start : start + n], gt, gh, gw, **geo)
        out.append(patchify_qwen2_vl_video(corrupt_clip(frames, aug, seed=seed + i, mean=mean, std=std), **geo))
        start += n
    if start != pv.shape[0]:
        raise ValueError(f"video_grid_thw covers {start} patches but pixel_values_videos has {pv.shape[0]}")
    return torch.cat(out).to(pv.dtype)


def _corrupt_qwen2_vl(pv: Tensor, grid_thw: Tensor, processor: Any, aug: AugmentationSpec, seed: int, mean: Any, std: Any) -> Tensor:
    ip = getattr(processor, "image_processor", processor)
    geo = {k: int(getattr(ip, k)) for k in ("patch_size", "merge_size", "temporal_patch_size")}
    out, start = [], 0
    for i, (gt, gh, gw) in enumerate(grid_thw.tolist()):
        if gt != 1:
            raise ValueError(f"image {i} has grid_t={gt}; only still images (grid_t == 1) can be corrupted")
        n = gt * gh * gw
        img = unpatchify_qwen2_vl(pv[start : start + n], gh, gw, **geo)
        # each image has its own size, so each is its own batch of one (seed + i keeps them distinct)
        bad = corrupt_images(img.unsqueeze(0), aug, seed=seed + i, mean=mean, std=std)[0]
        out.append(patchify_qwen2_vl(bad, **geo))
        start += n
    if start != pv.shape[0]:
        raise ValueError(f"image_grid_thw covers {start} patches but pixel_values has {pv.shape[0]}")
    return torch.cat(out).to(pv.dtype)


def _corrupt_crops(pv: Tensor, aug: AugmentationSpec, seed: int, mean: Any, std: Any) -> Tensor:
    b, n = pv.shape[:2]
    flat = pv.reshape(b * n, *pv.shape[2:])
    real = flat.flatten(1).ne(0).any(dim=1)
    out = flat.clone()
    if real.any():
        out[real] = corrupt_images(flat[real].float(), aug, seed=seed, mean=mean, std=std).to(pv.dtype)
    return out.reshape(pv.shape)


def corrupt_pixel_values(inputs: dict[str, Any], processor: Any, augmentation: AugmentationSpec, *, seed: int) -> dict[str, Any]:
    """A shallow copy of processor ``inputs`` whose ``pixel_values`` hold corrupted images and whose
    ``pixel_values_videos`` (where present) hold corrupted clips, every frame of a clip corrupted alike
    (:func:`corrupt_clip`).

    Args:
        inputs: Processor output (``pixel_values`` and, for Qwen2-VL, ``image_grid_thw``; ``pixel_values_videos``
            and, for Qwen2-VL, ``video_grid_thw``).
        processor: The processor (its image / video processor's ``image_mean``/``image_std`` and patch geometry).
        augmentation: Anything :func:`~vpa_lightning.augment.build_augmentation` accepts.
        seed: Makes the corruption reproducible.
    """
    out = dict(inputs)
    has_videos = inputs.get("pixel_values_videos") is not None
    if inputs.get("pixel_values") is None:
        if not has_videos:
            raise ValueError("the inputs hold neither pixel_values nor pixel_values_videos: nothing to corrupt")
        out["pixel_values_videos"] = _corrupt_videos(inputs, processor, augmentation, seed)
        return out
    pv = inputs["pixel_values"]
    mean, std = _normalisation(processor)
    if inputs.get("image_grid_thw") is not None:
        out["pixel_values"] = _corrupt_qwen2_vl(pv, inputs["image_grid_thw"], processor, augmentation, seed, mean, std)
    elif pv.dim() == 5:
        out["pixel_values"] = _corrupt_crops(pv, augmentation, seed, mean, std)
    elif pv.dim() == 4:
        out["pixel_values"] = corrupt_images(pv.float(), augmentation, seed=seed, mean=mean, std=std).to(pv.dtype)
    else:
        raise ValueError(f"cannot corrupt pixel_values of shape {tuple(pv.shape)} (no image_grid_thw)")
    if has_videos:  # another seed than the images': a video is not corrupted like the batch's first image
        out["pixel_values_videos"] = _corrupt_videos(inputs, processor, augmentation, seed + 7919)
    return out
