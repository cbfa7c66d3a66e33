"""``vpa judge --judge hf``: a prompt's media and question run once for all its rating rows vs every row run whole.

    python benchmarks/judge_throughput.py                 # CPU: LLaVA at 336 px (576 image tokens), Qwen2-VL video
    python benchmarks/judge_throughput.py --device cuda --dtype bfloat16

A local judge rates each answer on each aspect of its rubric by the next-token probabilities of the rating values:
one row per (answer, aspect), every row holding the prompt's image or video. Both sides rate the same prompts with
the same model and rubric (``vlfeedback``: 3 aspects) through :class:`vpa_lightning.collect.judge._HFJudge`:

* **shared** (vpa now): :func:`vpa_lightning.models.generation.shared_prefix_next_logits`, one row over the tokens
  the rows share (chat template, media, question) fills a KV cache, each row's own tokens (answer, aspect) run over it;
* **whole** (vpa before, and what a scorer that batches its rows does): all rows in one forward, each with the media.

Reported per model: prompts/s, rating rows/s, the ratio, and the largest difference between the two sides' scores.
They compute the same numbers up to rounding: the shared side's equal each row run alone (float64: to the last bit);
the whole side left-pads its rows, which shifts their positions, and RoPE's angles are computed in float32, so its
scores move by up to ~1e-4 on a 1-5 scale. One warm-up prompt per side, ``--repeats`` runs, the best kept. Not a test: timings
never go in tests. ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    # 336 px: LLaVA-1.5's 576 image tokens; a wider language model than the tests' so the rows cost something
    "image": ("tiny:llava?image_size=336&text_hidden=256", False),
    # 16 frames of 112 px: 8 temporal patches x (112 / 28)^2 = 128 merged video tokens per clip
    "video": ("tiny:qwen2_vl?image_size=112&text_hidden=256", True),
}


def _prompts(n: int, video: bool, frames: int, size: int):
    import numpy as np
    from PIL import Image

    from vpa_lightning.collect.prompts import Prompt
    from vpa_lightning.models.video import VideoClip

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if video:
            clip = VideoClip(frames=(rng.random((frames, size, size, 3)) * 255).astype(np.uint8), fps=2.0,
                             total_frames=frames, indices=list(range(frames)), name=f"clip{i}")
            out.append((Prompt(id=str(i), question="What happens in this clip? Describe the motion."), [], [clip]))
        else:
            image = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
            out.append((Prompt(id=str(i), question="What is in this image? Describe it in detail."), [image], []))
    return out


def _answers(k: int) -> list[str]:
    base = ["A red square sits near the top left corner of a grey background.",
            "There is a small cat sleeping on a blue sofa next to a window.",
            "The picture shows three people walking along a beach at sunset.",
            "Nothing can be seen clearly; the image is mostly noise."]
    return [base[i % len(base)] + f" ({i})" for i in range(k)]


def _run(judge, prompts, answers, shared: bool) -> tuple[float, list]:
    ctx = nullcontext() if shared else mock.patch("vpa_lightning.models.generation.shared_prefix_next_logits",
                                                  return_value=None)
    scores = []
    with ctx:
        judge.rate(prompts[0][0], answers, (prompts[0][1], prompts[0][2]))  # warm-up
        _sync(judge)
        t0 = time.perf_counter()
        for prompt, images, videos in prompts:
            scores.append(judge.rate(prompt, answers, (images, videos)))
        _sync(judge)
        return time.perf_counter() - t0, scores


def _sync(judge) -> None:
    import torch

    if next(judge.model.parameters()).is_cuda:
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--answers", type=int, default=4, help="answers per prompt (each rated on 3 aspects)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default="image,video")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/judge_throughput.json"))
    args = parser.parse_args(argv)

    import torch

    from vpa_lightning.collect.judge import _HFJudge
    from vpa_lightning.collect.rubrics import load_rubric
    from vpa_lightning.data.video import VideoSampling

    rubric = load_rubric("vlfeedback")
    answers = _answers(args.answers)
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        spec, video = MODELS[name]
        torch.manual_seed(0)
        judge = _HFJudge(rubric, spec, args.dtype, args.device, VideoSampling(max_frames=args.frames))
        prompts = _prompts(args.prompts, video, args.frames, 112 if video else 336)
        rows = len(prompts) * len(answers) * len(rubric.aspects)
        best: dict[str, float] = {}
        scores: dict[str, list] = {}
        for _ in range(args.repeats):
            for side in ("shared", "whole"):
                seconds, scores[side] = _run(judge, prompts, answers, side == "shared")
                best[side] = min(best.get(side, float("inf")), seconds)
        diff = max(abs(a[aspect][0] - b[aspect][0]) for pa, pb in zip(scores["shared"], scores["whole"])
                   for a, b in zip(pa, pb) for aspect in rubric.aspects)
        results[name] = {
            "model": spec, "video_frames": args.frames if video else None, "prompts": len(prompts),
            "rows_per_prompt": len(answers) * len(rubric.aspects),
            **{side: {"seconds": best[side], "prompts_per_s": len(prompts) / best[side], "rows_per_s": rows / best[side]}
               for side in best},
            "shared_over_whole": best["whole"] / best["shared"],
            "max_score_difference": diff,
        }
        r = results[name]
        print(f"{name:6s} {spec:45s} shared {r['shared']['prompts_per_s']:7.2f} prompts/s  whole "
              f"{r['whole']['prompts_per_s']:7.2f}  x{r['shared_over_whole']:.2f}  (scores differ by {diff:.1e})",
              flush=True)
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": args.device if args.device != "cpu" else f"cpu: {platform.processor() or platform.machine()}, "
                                                              f"{torch.get_num_threads()} threads",
        "torch": torch.__version__, "results": results,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
