"""``vpa seva generate|rounds`` (and ``python -m vpa_lightning.seva`` = ``vpa seva generate``): the
command line of :mod:`vpa_lightning.seva.generate` and :mod:`vpa_lightning.seva.rounds`.

::

    vpa seva generate --config configs/seva_llava15_7b_generate.yaml
    vpa seva rounds --config configs/seva_rounds_llava15_7b.yaml
    vpa seva generate --help          # every option, documented from the docstrings below

``generate`` answers the prompts on original and augmented images and writes the pairs into
shards (see :mod:`vpa_lightning.seva.generate`). ``rounds`` (:mod:`vpa_lightning.seva.rounds`) repeats, per round ``r``:

1. generate pairs with the current policy into ``OUT/round{r}/pairs`` (shards in ``rank0/``);
2. DPO-train on them with ``vpa fit --config FIT_CONFIG`` (model, shards, run dir, seed and
   reference cache overridden per round) into ``OUT/round{r}/train``;
3. export the result (``OUT/round{r}/model/adapter`` and ``/merged``); the merged model is the
   next round's policy - and, under LoRA, its reference (the adapters start fresh each round).

Each round's data, run and model live in their own ``round{r}/`` folder, with ``round.json``
(inputs, counts, final metrics) written last: a rerun skips the rounds that have one, so an
interrupted schedule resumes at the first unfinished round. Rounds run in one process; for
multi-GPU rounds run ``generate`` under torchrun and ``vpa fit`` per round yourself.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vpa_lightning.seva.generate import Augmentation
from vpa_lightning.seva.rounds import rounds

__all__ = ["generate", "generate_main", "main", "rounds"]


def generate(
    model: str,
    prompts_file: str,
    image_root: str,
    out_dir: str,
    augmentation: Augmentation = "diffusion_noise",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    val_fraction: float = 0.0,
    dtype: str | None = None,
    device: str | None = None,
    video_fps: float | None = 2.0,
    video_max_frames: int | None = 16,
    video_max_pixels: int | None = None,
) -> dict[str, Any]:
    """Generate SeVa pairs (answer on the original image = chosen, on the augmented one = rejected) into shards; video
    prompts (``video`` / ``videos`` fields) likewise, every frame of the clip augmented alike.

    Args:
        model: Policy: a local transformers VLM folder, a cached hub id, or ``tiny:llava`` /
            ``tiny:qwen2_vl`` / ``tiny:idefics3``.
        prompts_file: LLaVA-665k-style JSON list, or JSONL rows ``{"image", "question"}``.
        image_root: Directory that relative image paths are relative to.
        out_dir: Output: ``pairs-rank{r}.jsonl``, ``seva-rank{r}.json`` (counts) and shards in ``rank{r}/``.
        augmentation: Rejected-side corruption: a name (``diffusion_noise``, ``moco_v2``, ...),
            a mapping ``{name: diffusion_noise, step: 800}``, or a list of those (composed).
        max_new_tokens: Greedy decoding length.
        batch_size: Prompts per ``generate`` call.
        seed: Seed of the augmentation and of the shard shuffle.
        rank: This process's rank (default: ``$RANK`` or 0).
        world_size: Number of generating processes (default: ``$WORLD_SIZE`` or 1).
        val_fraction: Share of images held out in ``val-*`` shards.
        dtype: Weight dtype (``bfloat16`` on GPUs); ``None`` = float32.
        device: ``cuda``, ``cuda:1``, ``cpu``...; default: ``cuda:$LOCAL_RANK`` when CUDA is available, else CPU.
        video_fps: Video prompts: frames sampled per second (``null``: every frame, up to ``video_max_frames``).
        video_max_frames: Video prompts: most frames of one video, evenly spaced (``null``: no limit).
        video_max_pixels: Video prompts: most pixels of a frame (``null``: the processor's own size).
    """
    from vpa_lightning.seva.generate import generate_pairs

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    return generate_pairs(
        model,
        prompts_file,
        image_root,
        out_dir,
        augmentation=augmentation,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        val_fraction=val_fraction,
        dtype=dtype,
        device=device,
        video_fps=video_fps,
        video_max_frames=video_max_frames,
        video_max_pixels=video_max_pixels,
    )


def main(argv: list[str] | None = None) -> Any:
    """``vpa seva generate|rounds [--config FILE] [options]``."""
    from jsonargparse import auto_cli

    result = auto_cli([generate, rounds], args=argv, as_positional=False, prog="vpa seva")
    brief = result if isinstance(result, list) else {k: v for k, v in result.items() if k != "rejected_reasons"}
    print(json.dumps(brief, indent=2, default=str))
    return result


def generate_main(argv: list[str] | None = None) -> Any:
    """``python -m vpa_lightning.seva ARGS`` = ``vpa seva generate ARGS`` (e.g. under ``torchrun``)."""
    import sys

    return main(["generate", *(sys.argv[1:] if argv is None else argv)])
