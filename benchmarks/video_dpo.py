"""Video DPO: vpa's packed groups against vpa's plain rows and against the pairwise layout of LLaMA-Factory / ms-swift.

A video prompt is hundreds to thousands of tokens; its answers are tens. Three ways to get the policy's log-probs of
every answer (forward + backward of the summed log-probs, the step's part that differs between them):

* ``pairwise`` (what LLaMA-Factory and ms-swift do for video DPO; TRL has no video DPO): every pair is two rows,
  prompt + video + chosen and prompt + video + rejected, each row with its own video through the vision tower
  (``share_image=False``); a group of K answers is its ``K(K-1)/2`` pairs, so ``K(K-1)`` rows.
* ``plain`` (vpa, packing off): one row per answer, the vision tower once per group, prompt + video tokens in
  every row.
* ``packed`` (vpa's default): the vision tower once per group and prompt + video tokens once per group, each answer
  after them in one packed row (prefix sharing).

Settings: ``pairs`` (groups of 2 answers, one pair each) and ``groups`` (4 answers, all 6 pairs), at 8, 16 and 32
frames. Reported: pairs/s (best of ``--repeats`` after warm-up steps, median step), language-model tokens and vision
patches run per pair, and peak memory (each mode in its own process: peak RSS on CPU, ``max_memory_allocated`` on
CUDA). The model is Qwen2-VL at ``--shape`` (default ``qwen2vl-small``: 4 text layers 256 wide, a 2-layer vision
tower; ``qwen2vl7b`` on a GPU) with the tiny family's tokenizer and chat template; frames of coloured shapes.

    python benchmarks/video_dpo.py                                  # CPU, 224 px frames, 8/16/32 frames
    python benchmarks/video_dpo.py --frames 16 --settings groups    # one cell
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

ANSWERS = [
    "A red square slides from the left edge to the right edge while a blue bar drops towards the bottom of the frame.",
    "Nothing moves in the clip; the red square and the blue bar stay where they start.",
    "A blue square moves up and a red bar moves to the left, both slowly, until the last frame.",
    "The red square grows larger and the bar turns green halfway through the video.",
]
QUESTION = "Describe what moves in this video and in which direction. "


def _frames(n: int, size: int, seed: int):
    from tests.videos import moving_frames

    return moving_frames(n, (size, size), seed)


def make_groups(n_groups: int, k: int, frames: int, size: int) -> list[Any]:
    from vpa_lightning.models import PreferenceGroup
    from vpa_lightning.models.video import VideoClip

    out = []
    for g in range(n_groups):
        clip = VideoClip(frames=_frames(frames, size, g), fps=2.0, total_frames=frames, indices=list(range(frames)),
                         name=f"v{g}")
        out.append(PreferenceGroup(None, QUESTION, [ANSWERS[(g + i) % len(ANSWERS)] + f" ({i})" for i in range(k)],
                                   id=f"g{g}", images=[], videos=[clip], video_offsets=[0]))
    return out


def as_pairs(groups: list[Any]) -> list[Any]:
    """Each group's all pairs, each pair its own 2-answer group (the pairwise layout's rows)."""
    import dataclasses

    return [dataclasses.replace(g, responses=[g.responses[i], g.responses[j]], id=f"{g.id}:{i}>{j}")
            for g in groups for i in range(len(g.responses)) for j in range(i + 1, len(g.responses))]


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vpa_lightning.models import build_group_batch, group_logps
    from vpa_lightning.models.loading import load_vlm
    from vpa_lightning.models.packed import pack_groups

    torch.manual_seed(0)
    device = spec["device"]
    model, processor = load_vlm(spec["model_dir"], dtype="bfloat16" if device == "cuda" else None)
    model.to(device).train()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    k = 2 if spec["setting"] == "pairs" else 4
    groups = make_groups(spec["groups_per_step"], k, spec["frames"], spec["size"])
    pairs = spec["groups_per_step"] * k * (k - 1) // 2
    rows = as_pairs(groups) if spec["mode"] == "pairwise" else groups
    batch = build_group_batch(processor, rows).to(device)
    share_image = spec["mode"] != "pairwise"
    pack = spec["mode"] == "packed"
    if pack:
        lm_tokens = pack_groups(model, batch, max_tokens=1 << 30).tokens
    else:
        lm_tokens = int(batch.model_inputs["attention_mask"].sum())
    # the batch lists a video per row; with share_image the vision tower runs each group's once
    patches = int(batch.model_inputs["video_grid_thw"].prod(dim=-1).sum())
    if share_image:
        patches = patches * len(groups) // int(batch.model_inputs["input_ids"].shape[0])
    step_times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(spec["warmup"] + spec["steps"]):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = group_logps(model, batch, share_image=share_image, pack=pack)
        out.sum_logps.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= spec["warmup"]:
            step_times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    median = statistics.median(step_times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"pairs_per_step": pairs, "rows": int(batch.model_inputs["input_ids"].shape[0]), "lm_tokens_per_pair": lm_tokens / pairs,
            "vision_patches_per_pair": patches / pairs, "median_step_s": median, "pairs_per_s": pairs / median,
            "peak_mib": peak, "step_s": step_times}


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen2vl-small", help="a Qwen2-VL shape of benchmarks/trainer_vs_trl.py")
    p.add_argument("--frames", default="8,16,32", help="frames per video (comma list)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (a multiple of 28)")
    p.add_argument("--settings", default="pairs,groups")
    p.add_argument("--modes", default="packed,plain,pairwise")
    p.add_argument("--groups-per-step", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="runs per cell (best kept)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the policy")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/video_dpo.json"))
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        print(json.dumps(_worker(json.loads(a._worker))))
        return {}
    import torch

    from trainer_vs_trl import SHAPES, _build_qwen2_vl

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    shape = SHAPES[a.shape]
    if shape.get("family") != "qwen2_vl":
        p.error(f"--shape {a.shape} is not a Qwen2-VL shape")
    model_dir = tempfile.mkdtemp(prefix="vpa-video-bench-")
    _build_qwen2_vl(model_dir, a.size, 0, shape, device)  # a 7B shape is built on the GPU, in bf16 there
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device,
        "machine": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()}, {os.cpu_count()} threads",
        "torch": torch.__version__, "shape": a.shape, "size": a.size, "groups_per_step": a.groups_per_step,
        "checkpointing": a.checkpointing, "results": {},
    }
    for setting in a.settings.split(","):
        for frames in (int(f) for f in a.frames.split(",")):
            cell: dict[str, Any] = {}
            for mode in a.modes.split(","):
                spec = {"model_dir": model_dir, "device": device, "setting": setting, "frames": frames, "size": a.size,
                        "mode": mode, "groups_per_step": a.groups_per_step, "steps": a.steps, "warmup": a.warmup,
                        "checkpointing": a.checkpointing}
                runs = [_spawn(spec, a.timeout) for _ in range(a.repeats)]
                ok = [r for r in runs if "error" not in r]
                cell[mode] = max(ok, key=lambda r: r["pairs_per_s"]) if ok else runs[-1]
            for mode in ("packed", "plain"):
                if mode in cell and "pairwise" in cell and "error" not in cell[mode] and "error" not in cell["pairwise"]:
                    cell[f"{mode}_vs_pairwise"] = {
                        "pairs_per_s": cell[mode]["pairs_per_s"] / cell["pairwise"]["pairs_per_s"],
                        "peak_memory": cell[mode]["peak_mib"] / cell["pairwise"]["peak_mib"],
                        "lm_tokens": cell[mode]["lm_tokens_per_pair"] / cell["pairwise"]["lm_tokens_per_pair"],
                    }
            report["results"][f"{setting}/{frames}f"] = cell
            print(json.dumps({f"{setting}/{frames}f": {m: (v if "vs" in m else {x: round(v[x], 3) for x in (
                "pairs_per_s", "lm_tokens_per_pair", "vision_patches_per_pair", "peak_mib") if x in v} or v)
                for m, v in cell.items()}}), flush=True)
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")  # after every cell: a cut run keeps its rows
    return report


if __name__ == "__main__":
    main()
