"""``vpa eval``: evaluate models side by side on local benchmarks.

Usage::

    vpa eval --config configs/eval_pope.yaml
    vpa eval --config configs/eval_pope.yaml --limit 50 --out_dir runs/eval/smoke
    vpa eval --help

``models`` is a list of :class:`~vpa_lightning.eval.runner.ModelSpec` (``name`` plus ``path``
[+ ``adapter``] or ``checkpoint``). ``benchmarks`` is a list of mappings: ``{name: pope|mme|mmbench|mvbench,
<init args>}`` (see :data:`~vpa_lightning.eval.benchmarks.BENCHMARKS`) or ``{class_path:
pkg.mod.Class, init_args: {...}}`` for any other :class:`~vpa_lightning.eval.base.Benchmark`.
Nothing heavy (torch, transformers) is imported until the run starts.
"""

from __future__ import annotations

from typing import Any

from vpa_lightning.eval.runner import ModelSpec

__all__ = ["build_parser", "main", "parse_config", "run_eval"]


def run_eval(
    models: list[ModelSpec],
    benchmarks: list[dict[str, Any]],
    out_dir: str = "runs/eval",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    seed: int = 0,
    limit: int | None = None,
    device: str = "auto",
    video_fps: float | None = 2.0,
    video_max_frames: int | None = 16,
    video_max_pixels: int | None = None,
) -> dict[str, Any]:
    """Evaluate every model on every benchmark and write ``OUT_DIR/results.json`` and ``OUT_DIR/answers/``.

    Args:
        models: Models to compare; the first is the baseline of the Δ columns. Each: ``name``,
            ``path`` (``tiny:llava`` or a local Hugging Face folder), optional ``adapter`` (PEFT
            folder on top of ``path``) and ``dtype``; or ``checkpoint`` (a ``vpa fit`` ``.ckpt``) instead of ``path``.
        benchmarks: Benchmarks: ``{name: pope, file: ..., image_root: ..., split: ...}``,
            ``{name: mme, file: ..., image_root: ...}``, ``{name: mmbench, file: ..., image_root: ..., circular: true}``,
            ``{name: mvbench, root: ..., tasks: [...]}`` (video; see
            :class:`~vpa_lightning.eval.benchmarks.MVBench`), judge-scored ``{name: mmvet | llava_bench | mmhal, file: ..., image_root: ..., judge: {model: ...,
            max_concurrency: 8, cache_dir: ...}}`` (endpoint and key from ``VPA_JUDGE_BASE_URL`` /
            ``VPA_JUDGE_API_KEY``), or ``{class_path: pkg.mod.Class, init_args: {...}}``.
        out_dir: Output folder (``results.json``, ``answers/<model>/<benchmark>.jsonl``).
        batch_size: Generation batch size.
        max_new_tokens: Greedy generation length (short answers: 16 is plenty for these benchmarks).
        seed: Torch seed before each model's generation, and init seed of ``tiny:`` models.
        limit: At most this many questions per benchmark (smoke runs); MME image pairs and MMBench
            rotations stay together. ``null`` = all.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        video_fps: Video benchmarks: frames per second sampled from each video (``null``: every frame),
            as the trainer's ``--data.video_fps``.
        video_max_frames: Video benchmarks: at most this many frames per video, evenly spaced (``null``: no limit).
        video_max_pixels: Video benchmarks: pixels per frame at most (larger frames are scaled down; ``null``:
            the processor's own limit).
    """
    from vpa_lightning.eval.runner import evaluate

    specs, benches = _check(
        models, benchmarks, batch_size, max_new_tokens, limit, video_fps, video_max_frames, video_max_pixels
    )
    return evaluate(
        specs,
        benches,
        out_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        seed=seed,
        limit=limit,
        device=device,
        video_fps=video_fps,
        video_max_frames=video_max_frames,
        video_max_pixels=video_max_pixels,
    )


def _check(
    models: list[ModelSpec],
    benchmarks: list[dict[str, Any]],
    batch_size: int,
    max_new_tokens: int,
    limit: int | None,
    video_fps: float | None = None,
    video_max_frames: int | None = None,
    video_max_pixels: int | None = None,
) -> tuple[list[ModelSpec], list[Any]]:
    """Validated specs and built benchmarks; ``ValueError`` messages name the flag."""
    from vpa_lightning.eval.benchmarks import build_benchmark

    if not models:
        raise ValueError("--models: at least one model is required")
    specs = []
    for i, m in enumerate(models):
        spec = m if isinstance(m, ModelSpec) else ModelSpec(**m)
        try:
            spec.check()
        except ValueError as e:
            raise ValueError(f"--models[{i}]: {e}") from None
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--models: names must be unique, got {names}")
    if not benchmarks:
        raise ValueError("--benchmarks: at least one benchmark is required")
    benches = []
    for i, b in enumerate(benchmarks):
        try:
            benches.append(build_benchmark(dict(b)))
        except (TypeError, ValueError, ImportError, AttributeError) as e:
            raise ValueError(f"--benchmarks[{i}]: {e}") from None
    if batch_size < 1:
        raise ValueError(f"--batch_size: must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens: must be >= 1, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1 or null, got {limit}")
    if video_fps is not None and not video_fps > 0:
        raise ValueError(f"--video_fps: must be > 0 or null, got {video_fps}")
    for flag, value in (("--video_max_frames", video_max_frames), ("--video_max_pixels", video_max_pixels)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: must be >= 1 or null, got {value}")
    return specs, benches


def build_parser() -> Any:
    """The jsonargparse parser of ``vpa eval`` (``--config`` plus one flag per :func:`run_eval` argument)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="vpa eval",
        description="Evaluate vision-language models side by side on local benchmarks.",
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML file with any of the options below.",
    )
    parser.add_function_arguments(run_eval, as_group=False)
    return parser


def parse_config(argv: list[str]) -> dict[str, Any]:
    """Parsed and instantiated options (``models`` as :class:`ModelSpec` s), without running anything."""
    parser = build_parser()
    # `instantiate` replaced `instantiate_classes` in jsonargparse 4.49
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cfg = instantiate(parser.parse_args(argv))
    out = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(vars(cfg))
    out.pop("config", None)
    out["models"] = [
        m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in cfg.models
    ]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``vpa eval ARGS``: parse, check, run; returns the results dict (also in ``out_dir/results.json``)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    opts = parse_config(args)
    try:
        _check(
            opts["models"],
            opts["benchmarks"],
            opts["batch_size"],
            opts["max_new_tokens"],
            opts["limit"],
            opts["video_fps"],
            opts["video_max_frames"],
            opts["video_max_pixels"],
        )
    except ValueError as e:
        parser.error(str(e))
    return run_eval(**opts)


if __name__ == "__main__":
    main()
