"""Iterated SeVa: generate pairs with the policy, DPO-train it, export, regenerate with the new policy.

Per round ``r`` (each in ``OUT/round{r}/``): pairs from :func:`vpa_lightning.seva.generate.generate_pairs`
into ``pairs/``, ``vpa fit`` on them into ``train/``, the export into ``model/`` (the merged model is
the next round's policy), and ``round.json`` written last, so a rerun resumes at the first
unfinished round (inside it, at its first unfinished stage). The loop is :mod:`vpa_lightning.loop.rounds`, which
``vpa rounds`` runs with the policy's sampled, judged answers as data (``vpa rounds --source seva`` runs this one);
the command line here is ``vpa seva rounds`` (:mod:`vpa_lightning.seva.cli`).
"""

from __future__ import annotations

import os
from typing import Any

from vpa_lightning.seva.generate import Augmentation

__all__ = ["rounds", "seva_data_stage"]


def seva_data_stage(ctx: Any, *, prompts_files: list[str], image_root: str, augmentation: Augmentation = "diffusion_noise",
                    max_new_tokens: int = 32, batch_size: int = 8, val_fraction: float = 0.0,
                    dtype: str | None = None) -> dict[str, Any]:
    """SeVa's data stage of a round (:func:`vpa_lightning.loop.rounds.run_rounds`): the policy answers each prompt on
    the original and on the augmented image; the pairs go into ``pairs/`` (shards in ``pairs/rank0``)."""
    from vpa_lightning.seva import generate  # looked up per call (tests replace generate_pairs)

    prompts_file = prompts_files[ctx.round % len(prompts_files)]
    pairs_dir = ctx.dir / "pairs"
    counts = generate.generate_pairs(
        ctx.policy, prompts_file, image_root, pairs_dir, augmentation=augmentation, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=ctx.seed, val_fraction=val_fraction, dtype=dtype,
    )
    if counts["pairs_written"] == 0:
        raise RuntimeError(
            f"round {ctx.round}: no pairs to train on ({counts['identical_dropped']} identical answer pairs dropped, "
            f"{counts['rejected']} prompts rejected); see {pairs_dir}/seva-rank0.json"
        )
    return {"prompts_file": os.fspath(prompts_file), "pairs": {k: v for k, v in counts.items() if k != "rejected_reasons"},
            "shards": os.fspath(counts["shard_dir"])}


def rounds(
    model: str,
    prompts_file: str | list[str],
    image_root: str,
    out_dir: str,
    fit_config: str,
    num_rounds: int = 2,
    fit_args: list[str] | None = None,
    augmentation: Augmentation = "diffusion_noise",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    val_fraction: float = 0.0,
    dtype: str | None = None,
) -> list[dict[str, Any]]:
    """Iterated SeVa: generate pairs with the policy, DPO-train it, export, regenerate with the new policy
    (``vpa rounds --source seva``: the same loop, :mod:`vpa_lightning.loop.rounds`).

    Args:
        model: Round-0 policy (local folder, cached hub id or ``tiny:<family>``).
        prompts_file: One prompt file for every round, or one per round (a list of ``num_rounds`` files).
        image_root: Directory that relative image paths are relative to.
        out_dir: Gets ``round0/``, ``round1/``, ... (pairs, train run, exported model, ``round.json``).
        fit_config: The ``vpa fit`` YAML (loss, LoRA, optimiser, trainer); per round its model,
            ``data.train_shards``, ``trainer.default_root_dir``, ``model.reference_cache_dir`` and
            ``seed_everything`` are overridden.
        num_rounds: Number of generate -> train rounds.
        fit_args: Extra ``vpa fit`` arguments for every round, e.g. ``["--trainer.max_epochs=1"]``.
        augmentation: Rejected-side corruption (see ``vpa seva generate --help``).
        max_new_tokens: Greedy decoding length.
        batch_size: Prompts per ``generate`` call.
        seed: Base seed; round ``r`` uses ``seed + r`` for generation and training.
        val_fraction: Share of images held out in ``val-*`` shards each round.
        dtype: Weight dtype for generation; ``None`` = float32.

    Returns:
        One summary per round (also in ``OUT/round{r}/round.json``).
    """
    from functools import partial

    from vpa_lightning.loop.rounds import run_rounds

    if num_rounds < 1:
        raise ValueError(f"--num_rounds must be >= 1, got {num_rounds}")
    files = [prompts_file] if isinstance(prompts_file, str) else list(prompts_file)
    if len(files) not in (1, num_rounds):
        raise ValueError(f"--prompts_file: give one file or one per round ({num_rounds}), got {len(files)}")
    stage = partial(seva_data_stage, prompts_files=files, image_root=image_root, augmentation=augmentation,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, val_fraction=val_fraction, dtype=dtype)
    return run_rounds(model=model, out_dir=out_dir, fit_config=fit_config, num_rounds=num_rounds, data_stage=stage,
                      fit_args=fit_args, seed=seed)
