"""``vpa sample``, ``vpa judge`` and ``vpa serve``: collecting preference data (see :mod:`vpa_lightning.collect`).

::

    vpa sample prompts.jsonl --model careful=tiny:llava --model other=path/to/vlm --k 4 --out sampled.jsonl
    vpa judge sampled.jsonl --judge rule --reference truth.answer --out judged.jsonl
    vpa-shard build judged.jsonl --out shards --aspects Verified
    vpa serve tiny:llava --port 8000          # an OpenAI-compatible server over a local VLM

Exit status: 0 when the command wrote its output, 2 for a bad option (the message names it), 1 for a run that
produced nothing (every prompt rejected, no completion rated).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from vpa_lightning.errors import UsageError, VpaError

__all__ = ["judge_main", "sample_main", "serve_main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # as argparse, exit status 2, after the usage line
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _pool(args: argparse.Namespace) -> list[Any]:
    from vpa_lightning.collect.sample import PoolModel, SampleSettings, pool_models

    defaults = {"k": args.k, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    pool = []
    for spec in args.model or []:
        name, sep, model = spec.partition("=")
        if not sep or any(ch in name for ch in ":/?"):  # no NAME= given ("tiny:llava?image_size=56", a path)
            name, model = re.sub(r"[:?=&]", "-", spec.rstrip("/").split("/")[-1]), spec
        pool.append(PoolModel(name=name, model=model, backend=args.backend, base_url=args.base_url,
                              dtype=args.dtype, device=args.device, settings=SampleSettings(**defaults)))
    if args.pool:
        import yaml

        with open(args.pool, encoding="utf-8") as f:
            entries = yaml.safe_load(f)
        try:
            pool += pool_models(entries, defaults, f"--pool {args.pool}", backend=args.backend, base_url=args.base_url,
                                dtype=args.dtype, device=args.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if not pool:
        raise UsageError("give at least one --model NAME=SPEC or a --pool file")
    return pool


def add_video_flags(p: argparse.ArgumentParser) -> None:
    """``--video-fps``, ``--video-max-frames``, ``--video-max-pixels``: how video prompts are decoded (the trainer's
    ``--data.video_*`` defaults)."""
    p.add_argument("--video-fps", type=float, default=2.0, help="video prompts: frames sampled per second of video "
                   "(0: every frame, up to --video-max-frames; default 2, as the trainer)")
    p.add_argument("--video-max-frames", type=int, default=16, help="video prompts: most frames of one video, evenly "
                   "spaced over it (0: no limit; default 16, as the trainer)")
    p.add_argument("--video-max-pixels", type=int, default=None, help="video prompts: most pixels of a frame (larger "
                   "ones scaled down as decoded, and the processor's video size argument; default: the processor's)")


def video_sampling(args: argparse.Namespace, max_image_pixels: int | None = 89_478_485) -> Any:
    """The :class:`~vpa_lightning.data.video.VideoSampling` of :func:`add_video_flags`' flags (a bad value raises
    :class:`~vpa_lightning.errors.UsageError` naming its flag)."""
    import math

    from vpa_lightning.data.video import VideoSampling

    if not (math.isfinite(args.video_fps) and args.video_fps >= 0):
        raise UsageError(f"--video-fps must be a number >= 0 (0: every frame), got {args.video_fps}")
    if args.video_max_frames < 0:
        raise UsageError(f"--video-max-frames must be >= 0 (0: no limit), got {args.video_max_frames}")
    if args.video_fps == 0 and args.video_max_frames == 0:
        raise UsageError("--video-fps 0 and --video-max-frames 0: set at least one (every frame of a long video "
                         "would not fit in memory)")
    if args.video_max_pixels is not None and args.video_max_pixels < 1:
        raise UsageError(f"--video-max-pixels must be >= 1, got {args.video_max_pixels}")
    return VideoSampling(fps=args.video_fps or None, max_frames=args.video_max_frames or None,
                         max_pixels=args.video_max_pixels, max_image_pixels=max_image_pixels)


def sample_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``vpa sample``: K answers per prompt from a pool of models (see :mod:`vpa_lightning.collect.sample`)."""
    p = _Parser(prog="vpa sample", description="Sample K answers per prompt from a pool of VLMs into one "
                "VLFeedback-layout JSON-lines file (resumable).")
    p.add_argument("sources", nargs="+", help="prompt files (JSONL, JSON list, Parquet) or vpa-shard build folders")
    p.add_argument("--out", required=True, help="the output JSON-lines file (FILE.parts/, .rejects.jsonl, .summary.json beside it)")
    p.add_argument("--model", action="append", help="NAME=SPEC, repeatable: SPEC a local folder or tiny: model (hf), or "
                   "the served model's name (openai); NAME labels its completions")
    p.add_argument("--pool", help="a YAML list of models with their own settings: name, model, backend, base_url, dtype, "
                   "device, k, temperature, top_p, max_new_tokens, seed")
    p.add_argument("--backend", default="hf", choices=["hf", "openai"], help="backend of --model entries (default hf)")
    p.add_argument("--base-url", help="openai backend: the server's /v1 root (default $VPA_SAMPLE_BASE_URL, "
                   "$OPENAI_BASE_URL; the key from $VPA_SAMPLE_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--k", type=int, default=4, help="answers per prompt and model (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy; default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed; each prompt's draws are seeded by it, the model and the prompt id")
    p.add_argument("--dtype", default=None, help="hf: weight dtype (auto, bfloat16, float16, float32)")
    p.add_argument("--device", default=None, help="hf: device (default cuda when available, else cpu)")
    p.add_argument("--image-root", default=None, help="relative image and video paths are relative to this (default: each "
                   "file's folder)")
    p.add_argument("--cache-dir", default=None, help="openai: the request cache folder (default ~/.cache/vpa/judge)")
    p.add_argument("--limit", type=int, default=None, help="sample only the first N prompts")
    add_video_flags(p)
    args = p.parse_args(argv)
    from vpa_lightning.collect.sample import run_sample

    sampling = video_sampling(args)
    try:
        pool = _pool(args)
        summary = run_sample(args.sources, pool, args.out, image_root=args.image_root, cache_dir=args.cache_dir,
                             limit=args.limit, video_sampling=sampling)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    except RuntimeError as exc:
        raise VpaError(str(exc)) from exc
    rates = ", ".join(f"{n}: {m['prompts_per_s']:.2f} prompts/s, {m['tokens_per_s']:.0f} tokens/s"
                      for n, m in summary["models"].items() if m.get("prompts_per_s"))
    print(f"sampled {summary['sampled']} of {summary['prompts_in']} prompts ({summary['completions']} completions, "
          f"{summary['rejected']} rejected) into {summary['out']}" + (f"; {rates}" if rates else ""))
    return summary


def judge_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``vpa judge``: rate every completion of a sampled file (see :mod:`vpa_lightning.collect.judge`)."""
    from vpa_lightning.collect.judge import RULES, run_judge
    from vpa_lightning.collect.rubrics import RUBRICS

    p = _Parser(prog="vpa judge", description="Rate every completion of a VLFeedback-layout file; the same file "
                "comes out with annotations vpa-shard build reads.")
    p.add_argument("source", help="the sampled (or published VLFeedback) JSON-lines file")
    p.add_argument("--out", required=True, help="the judged file (never the input; .rejects.jsonl, .summary.json beside it)")
    p.add_argument("--judge", default="openai", choices=["openai", "hf", "rule"], help="who rates (default openai)")
    p.add_argument("--rubric", default="vlfeedback", help=f"{', '.join([*RUBRICS, 'claims'])} or a rubric file "
                   "(YAML/JSON: name, aspects, scale, template)")
    p.add_argument("--model", help="openai: the judge model's name (default $VPA_JUDGE_MODEL); hf: a local folder or tiny: model")
    p.add_argument("--base-url", help="openai: the server's /v1 root (default $VPA_JUDGE_BASE_URL, $OPENAI_BASE_URL; the "
                   "key from $VPA_JUDGE_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--cache-dir", default=None, help="openai: the request cache folder")
    p.add_argument("--max-concurrency", type=int, default=8, help="openai: requests in flight at once")
    p.add_argument("--dtype", default=None, help="hf: weight dtype")
    p.add_argument("--device", default=None, help="hf: device")
    p.add_argument("--rule", default="contains", choices=list(RULES), help="rule judge: how an answer is checked")
    p.add_argument("--reference", help="rule judge: dotted path to each record's ground truth (e.g. truth.answer)")
    p.add_argument("--choices", help="rule judge, contains: comma-separated values of which the answer may name only the reference")
    p.add_argument("--choices-field", help="rule judge, contains: dotted path to each record's list of choices (instead "
                   "of one --choices list), e.g. truth.choices")
    p.add_argument("--tolerance", type=float, default=0.0, help="rule judge, number: largest accepted difference")
    p.add_argument("--image-root", default=None, help="relative image and video paths are relative to this (default: "
                   "the input's folder)")
    add_video_flags(p)  # hf: the frames the judge sees; openai: the check that a row's videos can be read
    args = p.parse_args(argv)
    choices = [c.strip() for c in args.choices.split(",") if c.strip()] if args.choices else None
    sampling = video_sampling(args)
    try:
        summary = run_judge(args.source, args.out, judge=args.judge, rubric=args.rubric, model=args.model,
                            base_url=args.base_url, cache_dir=args.cache_dir, max_concurrency=args.max_concurrency,
                            dtype=args.dtype, device=args.device, rule=args.rule, reference=args.reference,
                            choices=choices, tolerance=args.tolerance, image_root=args.image_root,
                            choices_field=args.choices_field, video_sampling=sampling)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    except RuntimeError as exc:
        raise VpaError(str(exc)) from exc
    print(f"rated {summary['rated']} of {summary['completions']} completions of {summary['prompts']} prompts "
          f"({summary['rejected']} rejected) into {summary['out']}")
    return summary


def serve_main(argv: list[str] | None = None) -> None:
    """``vpa serve``: an OpenAI-compatible chat server over a local VLM (see :mod:`vpa_lightning.collect.serve`)."""
    p = _Parser(prog="vpa serve", description="Serve a local VLM behind an OpenAI-compatible /v1/chat/completions.")
    p.add_argument("model", help="a local transformers folder or tiny: model")
    p.add_argument("--name", default=None, help="the model name clients send (default: the spec)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; printed)")
    p.add_argument("--dtype", default=None, help="weight dtype")
    p.add_argument("--device", default=None, help="device (default cuda when available, else cpu)")
    args = p.parse_args(argv)
    import torch

    from vpa_lightning.collect.serve import make_server
    from vpa_lightning.models.loading import load_vlm

    try:
        model, processor = load_vlm(args.model, dtype=args.dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(f"vpa serve {args.model}: {exc}") from exc
    model = model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    server = make_server(model, processor, args.name or args.model, args.host, args.port)
    host, port = server.server_address[:2]
    print(json.dumps({"serving": args.name or args.model, "base_url": f"http://{host}:{port}/v1"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
