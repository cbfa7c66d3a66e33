"""Iterated SeVa: generate pairs with the policy, DPO-train it, export, regenerate with the new policy.

Per round ``r`` (each in ``OUT/round{r}/``): pairs from :func:`vpa_lightning.seva.generate.generate_pairs`
into ``pairs/``, ``vpa fit`` on them into ``train/``, the export into ``model/`` (the merged model is
the next round's policy), and ``round.json`` written last, so a rerun resumes at the first
unfinished round. The command line is ``vpa seva rounds`` (:mod:`vpa_lightning.seva.cli`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vpa_lightning.seva.generate import Augmentation

__all__ = ["rounds"]


def _round_fit_args(fit_config: str, model: str, shards: Path, round_dir: Path, seed: int, fit_args: list[str]) -> list[str]:
    return [
        "fit",
        "--config",
        fit_config,
        f"--model.model_name_or_path={model}",
        f"--data.train_shards={shards}",
        f"--trainer.default_root_dir={round_dir / 'train'}",
        # reference log-probs depend on the round's reference model: never share a cache across rounds
        f"--model.reference_cache_dir={round_dir / 'reference-cache'}",
        f"--seed_everything={seed}",
        *fit_args,
    ]


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
    """Iterated SeVa: generate pairs with the policy, DPO-train it, export, regenerate with the new policy.

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
    from vpa_lightning._io import write_text_atomic
    from vpa_lightning.cli import cli_main
    from vpa_lightning.export import export
    from vpa_lightning.seva import generate  # looked up per call (tests replace generate_pairs)

    if num_rounds < 1:
        raise ValueError(f"--num_rounds must be >= 1, got {num_rounds}")
    files = [prompts_file] if isinstance(prompts_file, str) else list(prompts_file)
    if len(files) not in (1, num_rounds):
        raise ValueError(f"--prompts_file: give one file or one per round ({num_rounds}), got {len(files)}")
    if not Path(fit_config).is_file():
        raise FileNotFoundError(f"--fit_config: no such file: {fit_config}")
    out = Path(out_dir)
    summaries: list[dict[str, Any]] = []
    policy = model
    for r in range(num_rounds):
        round_dir = out / f"round{r}"
        done = round_dir / "round.json"
        if done.exists():  # finished earlier: resume after it
            summary = json.loads(done.read_text())
            summaries.append(summary)
            policy = summary["model_out"]
            continue
        pairs_dir = round_dir / "pairs"
        counts = generate.generate_pairs(
            policy,
            files[r % len(files)],
            image_root,
            pairs_dir,
            augmentation=augmentation,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed + r,
            val_fraction=val_fraction,
            dtype=dtype,
        )
        if counts["pairs_written"] == 0:
            raise RuntimeError(
                f"round {r}: no pairs to train on ({counts['identical_dropped']} identical answer pairs dropped, "
                f"{counts['rejected']} prompts rejected); see {pairs_dir}/seva-rank0.json"
            )
        shards = Path(counts["shard_dir"])
        cli = cli_main(_round_fit_args(fit_config, policy, shards, round_dir, seed + r, list(fit_args or [])))
        written = export(cli.model, round_dir / "model", merged=True)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        summary = {
            "round": r,
            "model_in": policy,
            "prompts_file": os.fspath(files[r % len(files)]),
            "pairs": {k: v for k, v in counts.items() if k != "rejected_reasons"},
            "train_dir": os.fspath(round_dir / "train"),
            "model_out": os.fspath(written["merged"]),
            "adapter": os.fspath(written["adapter"]) if "adapter" in written else None,
            "metrics": metrics,
        }
        write_text_atomic(done, json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
        policy = summary["model_out"]
    return summaries
