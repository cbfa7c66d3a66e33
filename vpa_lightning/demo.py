"""``vpa demo``: the main job in one command - build the demo shards, train, print the before/after table.

::

    pip install ".[train]" && vpa demo                 # OUT = ./vpa-demo, about a minute or two on CPU
    vpa demo --out /tmp/d --seed 1 --num-images 240    # smaller / other seed
    vpa demo --rounds 3 --compare-offline              # on-policy rounds (vpa_lightning.loop.demo)
    vpa demo --video                                   # clips: a tiny Qwen2-VL learns motion and the last frame
    vpa demo --video -- --data.video_max_frames 1      # the same from the first frame only (chance)

Steps: write the embedded synthetic set (coloured shapes with rated answers, see
:mod:`vpa_lightning.data.demo`) into ``OUT/data``, build it with the Rust core into
``OUT/shards``, then run ``vpa fit`` with the demo config (``vpa_lightning/demo.yaml``, the same
file as ``configs/demo.yaml``) on them, with its run directory and reference cache under ``OUT``.
The ``PreferenceReport`` callback prints the ``metric | before | after`` table and a few held-out
questions with the greedy answers before and after training. Nothing is downloaded.

``--video`` does the same with the video demo world (:mod:`vpa_lightning.data.demo_video`: ms-swift rows whose
answers need the motion or the last frame of a clip) and ``vpa_lightning/demo_video.yaml`` (a tiny Qwen2-VL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["CONFIG", "VIDEO_CONFIG", "fit_args", "main"]

#: The demo's ``vpa fit`` config, shipped in the package (byte-identical to ``configs/demo.yaml``).
CONFIG = Path(__file__).with_name("demo.yaml")
#: The video demo's config (byte-identical to ``configs/demo_video.yaml``).
VIDEO_CONFIG = Path(__file__).with_name("demo_video.yaml")
_TRAIN_EXTRA = ("torch", "lightning", "transformers", "peft", "torchmetrics", "jsonargparse")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vpa demo",
        description="Build the embedded demo set (coloured shapes with rated answers) into shards, train a tiny "
        "VLM on it with RPO on CPU and print the before/after table of the held-out metrics and answers.",
    )
    p.add_argument("--out", default="vpa-demo", help="output directory: data/, shards/, runs/, reference-cache/ (default ./vpa-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model initialisation, the shard shuffle and training (default 0)")
    p.add_argument("--num-images", type=int, default=720, help="images in the demo set (default 720, what the config is tuned for); fewer is faster and learns less")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out for the before/after table (default 0.2)")
    p.add_argument("--max-epochs", type=int, default=None, help="training epochs (default: the config's, 10)")
    p.add_argument("--video", action="store_true", help="the video demo instead: clips of a moving shape that changes "
                   "colour in its last frame (ms-swift rows with videos), a tiny Qwen2-VL; needs PyAV (the train extra)")
    p.add_argument("--num-clips", type=int, default=480, help="--video: clips in the demo set (default 480)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (default: no limit)")
    rounds = p.add_argument_group("on-policy rounds (vpa rounds on the demo world, the rule judge; see vpa_lightning.loop.demo)")
    rounds.add_argument("--rounds", type=int, default=0, help="run N on-policy rounds from a weak starting policy instead "
                        "of the offline demo (default 0: the offline demo)")
    rounds.add_argument("--k", type=int, default=4, help="--rounds: answers sampled per prompt and round (default 4)")
    rounds.add_argument("--start-epochs", type=int, default=2, help="--rounds: epochs of the starting policy on the "
                        "world's ratings (default 2: a weak model)")
    rounds.add_argument("--round-epochs", type=int, default=3, help="--rounds: epochs of each round's fit (default 3)")
    rounds.add_argument("--compare-offline", action="store_true", help="--rounds: also one offline round with the same "
                        "number of rated answers (N x K per prompt) and epochs, from the same starting policy")
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="after `--`: more `vpa fit` options, e.g. -- --data.batch_size 8")
    return p


def fit_args(a: argparse.Namespace, shards: Path) -> list[str]:
    """The ``vpa fit`` arguments of the demo run."""
    out = Path(a.out)
    args = [
        "fit",
        "--config", str(VIDEO_CONFIG if getattr(a, "video", False) else CONFIG),
        f"--data.train_shards={shards}",
        f"--data.seed={a.seed}",
        f"--model.seed={a.seed}",  # the tiny model's initialisation (and the hparams must agree)
        f"--seed_everything={a.seed}",
        f"--trainer.default_root_dir={out / 'runs'}",
        f"--model.reference_cache_dir={out / 'reference-cache'}",
    ]
    if a.max_epochs is not None:
        args.append(f"--trainer.max_epochs={a.max_epochs}")
    if a.max_steps is not None:
        args.append(f"--trainer.max_steps={a.max_steps}")
    extra = list(a.fit_args)
    return args + (extra[1:] if extra[:1] == ["--"] else extra)


def main(argv: list[str] | None = None) -> Any:
    """``vpa demo [--out DIR] [--seed S] [--num-images N] ...``; returns the ``LightningCLI`` of the run."""
    from vpa_lightning.errors import UsageError, VpaError

    a = parser().parse_args(argv)
    if a.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {a.num_images}")
    if not 0.0 < a.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in (0, 1), got {a.val_fraction}")
    if a.num_clips < 1:
        raise UsageError(f"--num-clips must be >= 1, got {a.num_clips}")
    if a.video and a.rounds:
        raise UsageError("--video and --rounds cannot be combined yet: the rounds demo is the image world")
    missing = [m for m in _TRAIN_EXTRA + (("av", "torchvision") if a.video else ()) if _absent(m)]
    if missing:
        raise VpaError(f"the training extra is not installed (missing {', '.join(missing)}): pip install \"vpa[train]\" (or `pip install \".[train]\"` in a checkout)")

    if a.rounds:
        from vpa_lightning.loop.demo import run_demo_rounds

        if a.max_epochs is not None or a.max_steps is not None:
            raise UsageError("--rounds: use --start-epochs and --round-epochs (not --max-epochs / --max-steps)")
        extra = list(a.fit_args)
        try:
            return run_demo_rounds(Path(a.out), num_rounds=a.rounds, k=a.k, num_images=a.num_images,
                                   val_fraction=a.val_fraction, seed=a.seed, start_epochs=a.start_epochs,
                                   round_epochs=a.round_epochs, compare_offline=a.compare_offline,
                                   fit_args=extra[1:] if extra[:1] == ["--"] else extra, config=CONFIG)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        except RuntimeError as exc:  # a round that cannot go on (no pairs: every answer right or every one wrong)
            raise VpaError(f"{exc}\n(a stronger starting policy answers some questions right: raise --start-epochs, "
                           "--k or --num-images)") from exc

    from vpa_lightning.cli import cli_main
    from vpa_lightning.data import build
    from vpa_lightning.data.cli import summary
    from vpa_lightning.data.demo import make_demo

    out = Path(a.out)
    if a.video:
        from vpa_lightning.data.demo_video import make_video_demo

        annotations = make_video_demo(out / "data", num_clips=a.num_clips, frames=8, size=56, fps=4, seed=a.seed)
        what = f"--num-clips {a.num_clips}"
    else:
        annotations = make_demo(out / "data", num_images=a.num_images, seed=a.seed)
        what = f"--num-images {a.num_images}"
    manifest = build([str(annotations)], str(out / "shards"), val_fraction=a.val_fraction, seed=a.seed)
    print(summary(manifest), flush=True)
    if not manifest["counts"].get("groups_val"):
        raise UsageError(f"{what} with --val-fraction {a.val_fraction} holds out nothing: the before/after table needs some")
    config = VIDEO_CONFIG if a.video else CONFIG
    print(f"demo shards in {out / 'shards'}; training (vpa fit --config {config.name}) ...", flush=True)
    cli = cli_main(fit_args(a, out / "shards"))
    print(f"\nrun (checkpoints, logs) in {cli.trainer.log_dir or out / 'runs'}", flush=True)
    return cli


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    from vpa_lightning.cli import console_main

    sys.exit(console_main(["demo", *sys.argv[1:]]))
