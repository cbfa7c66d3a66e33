"""Augmentation throughput: Kornia batch path vs torchvision per-image transforms.

    python benchmarks/augment_throughput.py --batch-size 64 --size 336 --repeats 5

Both sides run the same MoCo-v2 pipeline (RandomResizedCrop scale (0.2, 1); ColorJitter
(0.4, 0.4, 0.4, 0.1) with p=0.8; grayscale p=0.2; Gaussian blur sigma in [0.1, 2] with p=0.5 and
the same kernel size; horizontal flip p=0.5) on a float32 ``[B, 3, H, W]`` batch in ``[0, 1]``:

* kornia: ``vpa_lightning.augment.moco_v2()`` on the whole batch, one call;
* torchvision: ``torchvision.transforms.v2`` applied image by image, then ``torch.stack``.

It runs on CPU, and on CUDA as well when ``torch.cuda.is_available()`` (both paths on the GPU
there). Each path gets ``--warmup`` untimed batches, then ``--repeats`` timed rounds of one batch
per path, interleaved so that background load hits both alike; the report is the median batch
time as images/s, the kornia/torchvision ratio of medians, the best batch of each and every
batch time. ``--json PATH`` also writes the figures as JSON; ``--stages`` also times each stage
alone (p=1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpa_lightning.augment import moco_v2
from vpa_lightning.augment.kornia_ops import default_blur_kernel


def torchvision_moco_v2(size: int):
    from torchvision.transforms import v2

    kernel = default_blur_kernel(size, size)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    )


def stage_pairs(size: int) -> dict:
    """Each MoCo-v2 stage with p=1, as (kornia module, torchvision per-image transform)."""
    from torchvision.transforms import v2

    from vpa_lightning import augment as A

    kernel = default_blur_kernel(size, size)
    return {
        "resized_crop": (
            A.RandomResizedCrop(scale=(0.2, 1.0)),
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        ),
        "color_jitter": (A.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)),
        "grayscale": (A.RandomGrayscale(p=1.0), v2.RandomGrayscale(p=1.0)),
        "gaussian_blur": (A.GaussianBlur(sigma=(0.1, 2.0), p=1.0), v2.GaussianBlur(kernel, sigma=(0.1, 2.0))),
        "horizontal_flip": (A.RandomHorizontalFlip(p=1.0), v2.RandomHorizontalFlip(p=1.0)),
    }


def time_batches(fn, batch: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    cuda = batch.device.type == "cuda"
    for _ in range(warmup):
        fn(batch)
    if cuda:
        torch.cuda.synchronize(batch.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(batch)
        if cuda:
            torch.cuda.synchronize(batch.device)
        times.append(time.perf_counter() - start)
        assert out.shape == batch.shape and out.dtype == batch.dtype
    return times


def bench_device(
    device: torch.device, batch_size: int, size: int, warmup: int, repeats: int, with_stages: bool = False
) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch = torch.rand(batch_size, 3, size, size, generator=gen).to(device)
    kornia_aug = moco_v2()
    tv_aug = torchvision_moco_v2(size)

    def kornia_fn(x: torch.Tensor) -> torch.Tensor:
        return kornia_aug(x)

    def tv_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([tv_aug(img) for img in x])

    with torch.no_grad():
        # Interleave the two paths, one batch each per round, so load from other processes
        # affects both alike.
        time_batches(kornia_fn, batch, warmup, 0)
        time_batches(tv_fn, batch, warmup, 0)
        k_times, t_times = [], []
        for _ in range(repeats):
            k_times += time_batches(kornia_fn, batch, 0, 1)
            t_times += time_batches(tv_fn, batch, 0, 1)
    k_med, t_med = statistics.median(k_times), statistics.median(t_times)
    stages = {}
    if with_stages:
        for name, (k_op, t_op) in stage_pairs(size).items():
            with torch.no_grad():
                ks = statistics.median(time_batches(k_op, batch, warmup, repeats))
                ts = statistics.median(
                    time_batches(
                        lambda x, t_op=t_op: torch.stack([t_op(i) for i in x]), batch, warmup, repeats
                    )
                )
            stages[name] = {
                "kornia_ms_per_image": 1e3 * ks / batch_size,
                "torchvision_ms_per_image": 1e3 * ts / batch_size,
            }
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "kornia_batch_s": k_med,
        "torchvision_batch_s": t_med,
        "kornia_images_per_s": batch_size / k_med,
        "torchvision_images_per_s": batch_size / t_med,
        "kornia_over_torchvision": t_med / k_med,
        "kornia_best_images_per_s": batch_size / min(k_times),
        "torchvision_best_images_per_s": batch_size / min(t_times),
        "kornia_times_s": k_times,
        "torchvision_times_s": t_times,
        "stages_p1": stages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--devices", default="auto", help="comma list (cpu,cuda) or 'auto' = cpu plus cuda if available"
    )
    parser.add_argument("--stages", action="store_true", help="also time each stage alone (p=1), per image")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    print("$ " + shlex.join(["python", *sys.argv]), flush=True)
    import kornia
    import torchvision

    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, kornia {kornia.__version__}, "
        f"python {platform.python_version()}, torch threads {torch.get_num_threads()}, "
        f"cpu count {os.cpu_count()}",
        flush=True,
    )
    print(
        f"MoCo-v2 pipeline, batch {args.batch_size} x 3 x {args.size} x {args.size} float32, "
        f"warmup {args.warmup}, median of {args.repeats} batches",
        flush=True,
    )

    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]

    results = []
    for name in devices:
        r = bench_device(
            torch.device(name), args.batch_size, args.size, args.warmup, args.repeats, args.stages
        )
        results.append(r)
        print(
            f"{r['device']:>5} ({r['device_name']}): kornia {r['kornia_images_per_s']:8.1f} img/s "
            f"({r['kornia_batch_s'] * 1e3:7.1f} ms/batch) | torchvision per-image "
            f"{r['torchvision_images_per_s']:8.1f} img/s ({r['torchvision_batch_s'] * 1e3:7.1f} ms/batch) | "
            f"kornia/torchvision = {r['kornia_over_torchvision']:.2f}x",
            flush=True,
        )
        print(
            f"      best batch: kornia {r['kornia_best_images_per_s']:8.1f} img/s | torchvision "
            f"{r['torchvision_best_images_per_s']:8.1f} img/s | per-batch seconds: kornia "
            f"{[round(t, 3) for t in r['kornia_times_s']]}, torchvision "
            f"{[round(t, 3) for t in r['torchvision_times_s']]}",
            flush=True,
        )
        for stage, st in r["stages_p1"].items():
            print(
                f"      stage {stage:<16} (p=1): kornia {st['kornia_ms_per_image']:7.2f} ms/img | "
                f"torchvision {st['torchvision_ms_per_image']:7.2f} ms/img",
                flush=True,
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"command": shlex.join(["python", *sys.argv]), "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
