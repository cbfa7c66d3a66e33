"""``vpa demo --rounds N``: on-policy rounds on the embedded demo world, with the rule judge, on CPU.

The world (coloured shapes, questions about colour, shape and count, see :mod:`vpa_lightning.data.demo`) is split by
image into prompts to sample and held-out prompts. The starting policy is the demo model fitted for a few epochs on
the world's published-style ratings of the sampling images (a weak model that answers some questions right). Each
round it answers every sampling prompt ``k`` times, the rule judge marks an answer right when it names the true
colour / shape / count and no other word of that kind (``truth.answer``, ``truth.choices``), prompts whose answers all
tie are dropped, the build pairs right over wrong, and a fit of ``round_epochs`` epochs trains the next policy against
the round's starting one. The held-out reward is the share of held-out questions the greedy policy answers right.

With ``compare_offline`` the same starting policy also gets one round of ``rounds * k`` answers per prompt and
``rounds * round_epochs`` epochs (the same number of rated answers and optimizer epochs), in ``OUT/offline``: the
on-policy loop against one offline round at equal cost. Everything resumes: a rerun of the same command goes on from
the first unfinished stage.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import yaml

from vpa_lightning._io import write_text_atomic

__all__ = ["run_demo_rounds"]


def _say(text: str) -> None:
    print(text, flush=True)


def _split(annotations: Path, val_fraction: float, seed: int) -> tuple[Path, Path]:
    """The world's rows split by image into ``prompts.jsonl`` (sampled, and the starting policy's ratings) and
    ``heldout.jsonl``, beside the annotations so the image paths resolve."""
    rows = [json.loads(line) for line in annotations.read_text().splitlines() if line.strip()]
    images = sorted({r["img_path"] for r in rows})
    random.Random(seed).shuffle(images)
    held = set(images[: max(1, round(len(images) * val_fraction))])
    prompts, heldout = annotations.with_name("prompts.jsonl"), annotations.with_name("heldout.jsonl")
    write_text_atomic(prompts, "".join(json.dumps(r) + "\n" for r in rows if r["img_path"] not in held))
    write_text_atomic(heldout, "".join(json.dumps(r) + "\n" for r in rows if r["img_path"] in held))
    return prompts, heldout


def _fit_config(base: Path, out: Path, epochs: int) -> Path:
    """The demo's fit config for one round: ``epochs`` epochs, checkpoints kept (the round exports one), no
    before/after report (the rounds table is the report)."""
    config = yaml.safe_load(base.read_text())
    config["trainer"]["max_epochs"] = epochs
    config["trainer"]["callbacks"] = []
    config["trainer"]["logger"] = False
    config["trainer"]["enable_model_summary"] = False
    config["trainer"]["limit_val_batches"] = 0  # the round's shards hold no validation split
    path = out / f"fit-{epochs}-epochs.yaml"
    write_text_atomic(path, f"# written by vpa demo --rounds from {base.name}\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _starting_policy(prompts: Path, out: Path, config: Path, seed: int, fit_args: list[str]) -> str:
    """The demo model fitted on the sampling images' ratings for the config's epochs, exported (merged) to
    ``OUT/start/model/merged``; reused when there."""
    from vpa_lightning.cli import cli_main
    from vpa_lightning.data import build
    from vpa_lightning.export import export

    merged = out / "start" / "model" / "merged"
    if (merged / "config.json").is_file():
        return str(merged)
    for stale in ("shards", "train", "model"):
        if (out / "start" / stale).exists():  # ours, from a run cut short: made again
            shutil.rmtree(out / "start" / stale)
    build([str(prompts)], str(out / "start" / "shards"), val_fraction=0.0, seed=seed)
    _say(f"starting policy: the demo model fitted on the ratings of {prompts.name} ...")
    cli = cli_main(["fit", "--config", str(config), f"--data.train_shards={out / 'start' / 'shards'}",
                    f"--trainer.default_root_dir={out / 'start' / 'train'}", f"--model.seed={seed}",
                    f"--seed_everything={seed}", "--model.reference_cache_dir=null", *fit_args])
    checkpoint = cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    export(checkpoint, out / "start" / "model", merged=True)
    return str(merged)


def run_demo_rounds(
    out: Path,
    *,
    num_rounds: int,
    k: int = 4,
    num_images: int = 720,
    val_fraction: float = 0.2,
    seed: int = 0,
    start_epochs: int = 2,
    round_epochs: int = 3,
    compare_offline: bool = False,
    fit_args: list[str] | None = None,
    config: Path,
) -> dict[str, Any]:
    """Run the demo's rounds (see the module doc); returns ``{"rounds": [...], "offline": [...] or None}``."""
    from vpa_lightning.data.demo import make_demo
    from vpa_lightning.loop.cli import rounds

    if num_rounds < 1 or k < 2:
        raise ValueError(f"--rounds must be >= 1 and --k >= 2, got {num_rounds} and {k}")
    if start_epochs < 1 or round_epochs < 1:
        raise ValueError(f"--start-epochs and --round-epochs must be >= 1, got {start_epochs} and {round_epochs}")
    out.mkdir(parents=True, exist_ok=True)
    annotations = make_demo(out / "data", num_images=num_images, seed=seed, bad_records=False)
    prompts, heldout = _split(annotations, val_fraction, seed)
    extra = list(fit_args or [])
    start = _starting_policy(prompts, out, _fit_config(config, out, start_epochs), seed, extra)
    common = dict(model=start, prompts=[str(prompts)], heldout_prompts=[str(heldout)], judge="rule", rule="contains",
                  reference_field="truth.answer", choices_field="truth.choices", temperature=1.0, top_p=1.0,
                  max_new_tokens=16, val_fraction=0.0, seed=seed)
    _say(f"\n{num_rounds} on-policy round(s): {k} answers per prompt from the current policy, the rule judge, "
         f"{round_epochs} epoch(s) each")
    on_policy = rounds(out_dir=str(out / "rounds"), fit_config=str(_fit_config(config, out, round_epochs)),
                       num_rounds=num_rounds, k=k, fit_args=extra, **common)
    offline = None
    if compare_offline:
        _say(f"\none offline round at the same cost: {num_rounds * k} answers per prompt from the starting policy, "
             f"{num_rounds * round_epochs} epoch(s)")
        offline = rounds(out_dir=str(out / "offline"), fit_config=str(_fit_config(config, out, num_rounds * round_epochs)),
                         num_rounds=1, k=num_rounds * k, fit_args=extra, **common)
    _say(f"\non-policy rounds ({out / 'rounds' / 'rounds.md'}; held-out reward = share of held-out questions the "
         "greedy policy answers right)")
    _say((out / "rounds" / "rounds.md").read_text())
    if offline is not None:
        _say(f"one offline round with the same rated answers and epochs ({out / 'offline' / 'rounds.md'})")
        _say((out / "offline" / "rounds.md").read_text())
    return {"rounds": on_policy, "offline": offline}

