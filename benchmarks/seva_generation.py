"""SeVa pair-generation throughput: prompts answered twice (original + augmented image) per second.

    python benchmarks/seva_generation.py --model tiny:llava --prompts 64 --batch-size 16
    python benchmarks/seva_generation.py --model /models/llava-1.5-7b-hf --dtype bfloat16 --prompts 512 --batch-size 64

Makes ``--prompts`` synthetic 336x336 images + questions in ``--workdir``, then

1. end to end: :func:`vpa_lightning.seva.generate.generate_pairs` (two greedy generations per prompt, the
   augmentation, the Rust shard build), reported as prompts/s and pairs written/s;
2. the stage split of the same loop on one pass: processor encode, chosen generation,
   augmentation (``corrupt_pixel_values``), rejected generation.

It runs on CUDA when available (``--device``), else on CPU. Timings are wall-clock after one
warm-up batch; ``--json PATH`` writes them. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_prompts(workdir: Path, n: int, size: int, seed: int) -> Path:
    from PIL import Image

    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        path = images / f"img{i:05d}.png"
        if not path.exists():
            arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(path)
        rows.append({"image": path.name, "question": f"What is shown in picture {i}? Describe the colours."})
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prompts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_split(model, processor, images, questions, batch_size: int, max_new_tokens: int, augmentation) -> dict[str, float]:
    from vpa_lightning.augment import build_augmentation
    from vpa_lightning.augment.pixels import corrupt_pixel_values
    from vpa_lightning.models.generation import encode_for_generation, greedy_generate

    aug = build_augmentation(augmentation)
    device = next(model.parameters()).device
    times = {"encode": 0.0, "generate_chosen": 0.0, "augment": 0.0, "generate_rejected": 0.0}
    for b, start in enumerate(range(0, len(images), batch_size)):
        t0 = time.perf_counter()
        inputs = encode_for_generation(processor, images[start : start + batch_size], questions[start : start + batch_size])
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        _sync(device)
        t1 = time.perf_counter()
        greedy_generate(model, processor, inputs, max_new_tokens)
        _sync(device)
        t2 = time.perf_counter()
        bad = corrupt_pixel_values(inputs, processor, aug, seed=b)
        _sync(device)
        t3 = time.perf_counter()
        greedy_generate(model, processor, bad, max_new_tokens)
        _sync(device)
        t4 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k] += dt
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:llava")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--augmentation", default="diffusion_noise")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vpa-seva-bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from PIL import Image

    from vpa_lightning.module import load_vlm
    from vpa_lightning.seva.generate import generate_pairs

    args.workdir.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.workdir, args.prompts, args.size, seed=0)
    model, processor = load_vlm(args.model, dtype=args.dtype)
    model.to(args.device).eval()
    device = next(model.parameters()).device
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    images = [Image.open(args.workdir / "images" / r["image"]).convert("RGB") for r in rows]
    questions = [r["question"] for r in rows]

    stage_split(model, processor, images[: args.batch_size], questions[: args.batch_size], args.batch_size, args.max_new_tokens, args.augmentation)  # warm-up
    split = stage_split(model, processor, images, questions, args.batch_size, args.max_new_tokens, args.augmentation)

    _sync(device)
    t0 = time.perf_counter()
    counts = generate_pairs(
        (model, processor),
        prompts,
        args.workdir / "images",
        args.workdir / "out",
        augmentation=args.augmentation,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        device=str(device),
    )
    _sync(device)
    total = time.perf_counter() - t0
    result = {
        "command": "python benchmarks/seva_generation.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": args.model,
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "seconds_end_to_end": round(total, 3),
        "prompts_per_s": round(counts["generated"] / total, 2),
        "pairs_written": counts["pairs_written"],
        "identical_dropped": counts["identical_dropped"],
        "pairs_per_s": round(counts["pairs_written"] / total, 2),
        "stage_seconds": {k: round(v, 3) for k, v in split.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
