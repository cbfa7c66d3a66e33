"""vpa's trainer vs TRL's ``DPOTrainer``: DPO training throughput and peak memory on one LLaVA-shaped VLM.

    python benchmarks/trainer_vs_trl.py                      # defaults, CPU (and CUDA if available)
    python benchmarks/trainer_vs_trl.py --steps 10 --pairs-per-step 8 --groups-per-step 2 --device cpu

Model: a randomly initialised ``LlavaForConditionalGeneration`` built from configs (nothing is
downloaded): CLIP vision tower (``--image-size`` 224, patch 14: 256 image tokens, 2 layers, hidden
128) + Llama text model (hidden 256, 4 layers, 8 heads / 4 KV heads), with the byte-level BPE
tokenizer, chat template and ``LlavaProcessor`` of :mod:`vpa_lightning.models.tiny`. It is saved
once to a temporary folder; both sides load the same weights from there.

Both sides train the same thing: LoRA r=16, alpha=32, dropout 0 on every ``nn.Linear`` of the
language model (the regex of ``vpa_lightning.module.default_lora_targets``), the reference is the
same network with the adapters disabled, DPO sigmoid loss with beta 0.1 on summed response
log-probs, AdamW (lr 5e-6, no weight decay, cosine schedule without warm-up), gradient clipping at
norm 1.0, float32, gradient checkpointing with ``--gradient-checkpointing`` (both sides, non-reentrant), ``max_length`` 512, data collated on the fly in the
training process (no DataLoader workers). Each side is used the way its users run it:

* **vpa**: ``VisionDPOModule`` trained by a ``lightning.Trainer.fit`` over a ``DataLoader`` of
  :class:`~vpa_lightning.data.datamodule.PreferenceExample` s collated by the data module's own
  :class:`~vpa_lightning.data.datamodule.GroupCollator` (one group = one image, one prompt, its K
  responses and its pairs). Per step: one no-grad reference forward and one policy forward +
  backward over the ``N = sum(K)`` distinct responses of the batch (each response once), then the
  loss over all pairs of the groups.
* **TRL**: ``trl.DPOTrainer`` (``Trainer.train``) on a ``datasets.Dataset`` in TRL's vision format
  (``images`` column + conversational ``prompt`` / ``chosen`` / ``rejected``), ``processing_class``
  = the processor, ``peft_config`` = the same LoRA config, ``precompute_ref_log_probs=False``.
  One dataset row is one pair, so per step: one no-grad reference forward and one policy forward +
  backward over ``2 x pairs`` sequences (the chosen and the rejected of every pair).

Settings:

1. ``pairwise`` (SeVa-like): ``--pairs-per-step`` (image, prompt, chosen, rejected) pairs per step;
   vpa gets them as K=2 groups, TRL as pair rows: both run ``2 x pairs`` sequences per forward.
2. ``groups`` (VLFeedback-like): every prompt has 4 ranked responses and all 6 pairs among them;
   ``--groups-per-step`` groups per step = ``6 x groups`` pairs. vpa runs ``4 x groups``
   sequences per forward; TRL gets the 6 pairs of each group as 6 rows (``6 x groups`` rows per
   step) and runs ``12 x groups`` sequences per forward, every response 3 times.

Differences that remain: TRL's conversational format scores ``response<|end|>\n`` (the chat
template's newline after the end-of-turn token) where vpa scores ``response<|end|>``: one more token
per sequence on the TRL side (about 0.3 % of a ~330-token sequence). TRL's fused LM head also
computes per-token entropy, mean logit and top-1 metrics, and vpa's module updates its torchmetrics;
both are part of how each tool runs. Sequences are right-padded to the longest of the batch on both
sides (TRL left-pads prompts, then flushes left).

Measurement: each (setting, side) runs in its own subprocess (peak memory is its own: peak RSS
``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), ``--warmup`` untimed steps then
``--steps`` timed optimizer steps, timed between step-end timestamps (a Lightning callback's
``on_train_batch_end``; a ``TrainerCallback.on_step_end`` for TRL), so batch collation is inside the
timed window on both sides. Runs are interleaved (side order alternates) and repeated
``--repeats`` times; the best throughput of each side is kept (this VM is noisy). The first step's
loss is printed for both: with LoRA at identity the policy equals the reference, so it must be
ln 2 = 0.6931 on both sides, which checks that they compute the same loss. ``--json PATH`` writes
the command line, device, versions and all figures. Not a test: timings never go in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BETA = 0.1
LR = 5e-6
LORA_R, LORA_ALPHA = 16, 32
MAX_GRAD_NORM = 1.0
K_GROUP = 4  # responses per VLFeedback-like group

#: The default (CPU) shape; ``--shape llava7b-2l`` is LLaVA-1.5-7B's widths with 2 text layers, ``llava7b`` and
#: ``qwen2vl7b`` the full 7B models (GPU check); ``qwen2vl-small`` the Qwen2-VL path at the CPU default's size.
DEFAULT_SHAPE = {"family": "llava", "vision_hidden": 128, "vision_layers": 2, "vision_heads": 4, "text_hidden": 256,
                 "text_intermediate": 704, "text_layers": 4, "text_heads": 8, "text_kv_heads": 4, "vocab": 0}
SHAPES = {
    "small": DEFAULT_SHAPE,
    # LLaVA-1.5-7B: CLIP ViT-L/14 (1024 wide, 16 heads; 336 px -> 576 image tokens), Vicuna-7B (4096 wide, 11008 MLP,
    # 32 heads, 32,000 vocabulary); depth reduced to fit a time budget
    "llava7b-2l": {"vision_hidden": 1024, "vision_layers": 2, "vision_heads": 16, "text_hidden": 4096,
                   "text_intermediate": 11008, "text_layers": 2, "text_heads": 32, "text_kv_heads": 32, "vocab": 32000},
    # full depth: CLIP ViT-L/14-336 (24 layers), Vicuna-7B (32 layers); weights in bf16 on both sides
    "llava7b": {"vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16, "text_hidden": 4096,
                "text_intermediate": 11008, "text_layers": 32, "text_heads": 32, "text_kv_heads": 32, "vocab": 32000,
                "bf16_weights": 1},
    # Qwen2-VL-7B: ViT of 32 layers, 1280 wide, 16 heads, patch 14, 2x2 merge (336 px -> 144 image tokens); Qwen2-7B
    # text: 3584 wide, 18944 MLP, 28 layers, 28 heads / 4 KV heads (grouped-query), 152,064 vocabulary, M-RoPE
    "qwen2vl7b": {"family": "qwen2_vl", "vision_hidden": 1280, "vision_layers": 32, "vision_heads": 16,
                  "text_hidden": 3584, "text_intermediate": 18944, "text_layers": 28, "text_heads": 28, "text_kv_heads": 4,
                  "vocab": 152064, "bf16_weights": 1},
    "qwen2vl-small": {"family": "qwen2_vl", "vision_hidden": 64, "vision_layers": 2, "vision_heads": 2, "text_hidden": 256,
                      "text_intermediate": 704, "text_layers": 4, "text_heads": 8, "text_kv_heads": 4, "vocab": 0},
}

QUESTIONS = [
    "What is in the image? Describe the picture in detail.",
    "How many people are in this picture?",
    "Is there a car in the image?",
    "What is the weather like in this scene?",
    "Describe the objects on the table.",
    "What is the man doing?",
]


# -- model and data ------------------------------------------------------------------------------
def build_model(out_dir: str, image_size: int, seed: int = 0, shape: dict[str, int] | None = None,
                device: str = "cpu") -> None:
    """Build the LLaVA-shaped model + processor from configs and save both to ``out_dir`` (the random
    initialisation runs on ``device``: a 1 B-parameter shape initialises in seconds on a GPU, not minutes)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from vpa_lightning.models.tiny import (
        _image_processor_class,
        build_tiny_tokenizer,
        chat_template,
    )

    shape = {**DEFAULT_SHAPE, **(shape or {})}
    if shape["family"] == "qwen2_vl":
        return _build_qwen2_vl(out_dir, image_size, seed, shape, device)
    patch = 14
    if image_size % patch:
        raise ValueError(f"--image-size must be a multiple of {patch}")
    tokenizer = build_tiny_tokenizer(["<image>"])
    vision = CLIPVisionConfig(
        hidden_size=shape["vision_hidden"],
        intermediate_size=4 * shape["vision_hidden"],
        projection_dim=128,
        num_hidden_layers=shape["vision_layers"],
        num_attention_heads=shape["vision_heads"],
        image_size=image_size,
        patch_size=patch,
    )
    text = LlamaConfig(
        vocab_size=max(len(tokenizer), shape["vocab"]),
        hidden_size=shape["text_hidden"],
        intermediate_size=shape["text_intermediate"],
        num_hidden_layers=shape["text_layers"],
        num_attention_heads=shape["text_heads"],
        num_key_value_heads=shape["text_kv_heads"],
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    _save(model, processor, out_dir, shape, device)


def _save(model, processor, out_dir: str, shape: dict[str, Any], device: str) -> None:
    import torch

    if shape.get("bf16_weights"):  # a 7B model is trained from bf16 weights (half the bytes to save and load)
        model.to(torch.bfloat16)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _build_qwen2_vl(out_dir: str, image_size: int, seed: int, shape: dict[str, Any], device: str) -> None:
    """A Qwen2-VL of ``shape``'s widths with the tiny family's tokenizer, processor and chat template."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vpa_lightning.models.tiny import build_tiny_vlm

    if image_size % 28:
        raise ValueError("--image-size must be a multiple of 28 for Qwen2-VL (patch 14, 2x2 merge)")
    with torch.device("meta"):
        tiny, processor = build_tiny_vlm("qwen2_vl", image_size=image_size)
    tok = processor.tokenizer
    head_dim = shape["text_hidden"] // shape["text_heads"]
    half = head_dim // 2  # M-RoPE: temporal, height, width sections of the rotary half (16/24/24 at 128 dims)
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    config = Qwen2VLConfig(
        text_config={"vocab_size": max(len(tok), shape["vocab"]), "hidden_size": shape["text_hidden"],
                     "intermediate_size": shape["text_intermediate"], "num_hidden_layers": shape["text_layers"],
                     "num_attention_heads": shape["text_heads"], "num_key_value_heads": shape["text_kv_heads"],
                     "max_position_embeddings": 4096, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "tie_word_embeddings": False,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section}},
        vision_config={"depth": shape["vision_layers"], "embed_dim": shape["vision_hidden"], "hidden_size": shape["text_hidden"],
                       "mlp_ratio": 4, "num_heads": shape["vision_heads"], "in_channels": 3, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=tiny.config.image_token_id, video_token_id=tiny.config.video_token_id,
        vision_start_token_id=tiny.config.vision_start_token_id, vision_end_token_id=tiny.config.vision_end_token_id,
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    _save(model, processor, out_dir, shape, device)


def image_tokens(shape: dict[str, Any], image_size: int) -> int:
    """Image tokens per image: LLaVA's CLIP patches (CLS dropped), Qwen2-VL's merged 2x2 patches."""
    return (image_size // 14) ** 2 // (4 if shape.get("family") == "qwen2_vl" else 1)


def attention_pairs(lengths: list[int]) -> int:
    """(query, key) pairs of causal attention over sequences of ``lengths`` tokens."""
    return sum(n * (n + 1) // 2 for n in lengths)


def vpa_attention_pairs(inputs: Any, shared: bool) -> int:
    """(query, key) pairs vpa's forward attends over a batch: each row causally (plain), or with the group's
    prefix once and each response over prefix + itself (packed, prefix sharing)."""
    prompt = inputs.prompt_lengths.tolist()
    total = inputs.model_inputs["attention_mask"].sum(dim=1).tolist()
    if not shared:
        return attention_pairs(total)
    pairs, row = 0, 0
    for k in inputs.group_sizes:
        if k:
            p = prompt[row]
            pairs += p * (p + 1) // 2
            for r in range(row, row + k):
                n = total[r] - p
                pairs += n * p + n * (n + 1) // 2
        row += k
    return pairs


def make_groups(n_groups: int, k: int, image_size: int, seed: int) -> list[dict[str, Any]]:
    """``n_groups`` synthetic groups: a smooth random image, a question, ``k`` responses of 3-5 sentences."""
    import numpy as np
    from PIL import Image

    from vpa_lightning.models.tiny import _CORPUS

    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        small = (nprng.random((8, 8, 3)) * 255).astype("uint8")
        image = Image.fromarray(small).resize((image_size, image_size), Image.BILINEAR)
        responses = [" ".join(rng.sample(_CORPUS, rng.randint(3, 5))) for _ in range(k)]
        groups.append({"key": f"g{seed}-{g:05d}", "image": image, "prompt": rng.choice(QUESTIONS), "responses": responses})
    return groups


def all_pairs(k: int) -> list[tuple[int, int]]:
    """Ranked responses: response i is preferred to response j for every i < j."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


# -- measurement helpers ---------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _finish(spec: dict[str, Any], stamps: list[float], loss0: float | None, pairs_per_step: int, extra: dict,
            tokens: list[float], flop_tokens: list[float], params: tuple[int, int], attn_pairs: list[float]) -> dict:
    """Throughput, peak memory, tokens and MFU of the timed steps. ``tokens[i]`` / ``flop_tokens[i]``: the
    non-padding tokens of step i's batch as built / as run through the model (the shared prefix once when
    packed); MFU counts ``flop_tokens`` with vpa's ``flops_per_token`` (the formula ``vpa fit`` logs) over
    the device's dense peak (:func:`vpa_lightning.callbacks.peak_flops`), so it is a hardware figure:
    padding and gradient-checkpointing recomputation are not model work."""
    import torch

    from vpa_lightning.callbacks import flops_per_token, peak_flops

    warmup, steps = spec["warmup"], spec["steps"]
    if len(stamps) < warmup + steps:
        raise RuntimeError(f"only {len(stamps)} steps recorded, expected {warmup + steps}")
    # stamps[i] = end of step i+1; the timed window is steps warmup+1 .. warmup+steps
    elapsed = stamps[warmup + steps - 1] - stamps[warmup - 1]
    step_times = [b - a for a, b in zip(stamps[warmup - 1 : warmup + steps - 1], stamps[warmup : warmup + steps])]
    out = {
        "seconds": elapsed,
        "step_seconds": step_times,
        "pairs_per_step": pairs_per_step,
        "pairs_per_s": steps * pairs_per_step / elapsed,
        "pairs_per_s_median_step": pairs_per_step / sorted(step_times)[len(step_times) // 2],
        "loss_step0": loss0,
        "rss_before_train_mib": spec["_rss_before"],
        **extra,
    }
    timed = slice(warmup, warmup + steps)
    out["tokens_per_step"] = sum(tokens[timed]) / steps
    out["processed_tokens_per_s"] = sum(flop_tokens[timed]) / elapsed
    out["params_non_embedding"], out["params_trainable"] = params
    out["flops_per_token"] = flops_per_token(*params)
    # attention: 4 d FLOPs per (query, key) pair and layer forward, x4 for policy forward + backward + reference
    out["attention_pairs_per_step"] = sum(attn_pairs[timed]) / steps
    attn_flops = 16 * spec["text_hidden"] * spec["text_layers"] * sum(attn_pairs[timed])
    out["tflops_per_s"] = (out["flops_per_token"] * sum(flop_tokens[timed]) + attn_flops) / elapsed / 1e12
    median = sorted(step_times)[len(step_times) // 2]
    out["median_step_s"], out["max_step_s"] = median, max(step_times)
    out["max_over_median_step"] = max(step_times) / median
    dtype = torch.bfloat16 if spec.get("precision") == "bf16-mixed" else torch.float32
    peak = peak_flops(torch.device(spec["device"], 0) if spec["device"] == "cuda" else torch.device("cpu"), dtype)
    out["peak_tflops"] = peak / 1e12 if peak else None
    out["mfu"] = out["tflops_per_s"] * 1e12 / peak if peak else None
    if spec["device"] == "cuda":
        out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_memory_mib"] = out["peak_cuda_allocated_mib"]
    else:
        out["peak_rss_mib"] = _peak_rss_mib()
        out["peak_memory_mib"] = out["peak_rss_mib"]
    return out


# GPU kernel kinds by name (cuBLAS/cuBLASLt GEMMs are nvjet_*/sm90_xmma_*/cutlass_*/*gemm*; flash and cuDNN
# attention; copies); everything else is elementwise, normalisation, reductions and the optimizer's kernels
_KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|s16816|cublas|splitk", re.I)),
    ("memcpy_memset", re.compile(r"^memcpy|^memset", re.I)),
)


_NOT_KERNELS = {"Activity Buffer Request", "Lazy Function Loading"}  # CUPTI's and the driver's own rows


def kernel_breakdown(rows: list[tuple[str, float, int]], wall_ms: float) -> dict[str, Any]:
    """GPU time of one profiled step by kernel kind. ``rows``: (kernel name, self GPU ms, launches) of the
    profiler's device events; ``wall_ms``: the step's wall time. ``busy`` = kernel time / wall time (the GPU
    idles for the rest: host overhead or synchronisations); MFU is bounded by the GEMM share of the wall time
    times the GEMMs' own efficiency. The profiler's own step ranges (``ProfilerStep*``) and user annotations
    (names with ``#``, e.g. ``Optimizer.step#AdamW.step``) span other kernels and are left out."""
    kinds: dict[str, dict[str, float]] = {}
    for name, ms, count in rows:
        if name.startswith("ProfilerStep") or "#" in name or name in _NOT_KERNELS or ms <= 0:
            continue
        kind = next((k for k, pattern in _KERNEL_KINDS if pattern.search(name)), "other")
        entry = kinds.setdefault(kind, {"ms": 0.0, "launches": 0})
        entry["ms"] += ms
        entry["launches"] += count
    total = sum(e["ms"] for e in kinds.values())
    for entry in kinds.values():
        entry["ms"] = round(entry["ms"], 2)
        entry["share_of_kernel_time"] = round(entry["ms"] / total, 4) if total else 0.0
    return {"kernel_ms": round(total, 2), "wall_ms": round(wall_ms, 2),
            "busy": round(total / wall_ms, 4) if wall_ms else None, "kinds": kinds}


class _Phases:
    """Where each step's time goes: data (the previous step's end to this one's start: batch collation),
    forward (vpa only: HF's Trainer has no hook between forward and backward), backward, optimizer (the rest),
    garbage-collector pauses, and on CUDA the caching allocator's device allocations and retries. With
    ``--phases`` the GPU is synchronised at each mark (the stamps then mean what they say, at a small cost).
    With ``--profile`` each step is also one cycle of torch's profiler, and the ops that took most of its time
    (self CPU time, and self CUDA time on a GPU) are kept per step: a slow step names its kernels. With
    ``--profile-last`` one step after the timed ones runs under the profiler instead (the timed steps run
    without it), and its GPU time is also split by kernel kind (:func:`kernel_breakdown`): what keeps MFU low."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import gc

        self.cuda = spec["device"] == "cuda"
        self.sync = self.cuda and spec.get("phases", False)
        self.steps: list[dict[str, float]] = []
        self.marks: dict[str, float] = {}
        self.gc_seconds = 0.0
        self._gc_start: float | None = None
        self._last_end: float | None = None
        self._counters = self._allocator()
        self._compiled = self._compiles()
        gc.callbacks.append(self._on_gc)
        self.profiles: list[dict[str, Any]] = []
        self._prof = None
        self._closing = False
        # --profile-last: the profiler runs over step `_profile_at` only (0-based; the step after the timed ones)
        self._profile_at = spec["warmup"] + spec["steps"] if spec.get("profile_last") else None
        self._last_prof = None
        self._last_t0 = 0.0
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile, schedule

            activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])]
            self._prof = profile(activities=activities, schedule=schedule(wait=0, warmup=0, active=1),
                                 on_trace_ready=self._on_trace)
            self._prof.start()

    def _on_trace(self, prof) -> None:
        events = prof.key_averages()

        def top(attr: str) -> list[tuple[str, float, int]]:
            rows = [(e.key, getattr(e, attr, 0.0) / 1e3, e.count) for e in events]  # microseconds -> ms
            return [(k, round(ms, 2), n) for k, ms, n in sorted(rows, key=lambda r: -r[1])[:12] if ms > 0]

        # step i's cycle ends at its end (the first one includes the set-up); the last, at close, is the teardown
        step = "teardown" if self._closing else len(self.profiles)
        self.profiles.append({"step": step, "self_cpu_ms": top("self_cpu_time_total"),
                              **({"self_cuda_ms": top("self_device_time_total")} if self.cuda else {})})

    def close(self) -> None:
        if self._last_prof is not None:  # the profiled step never ended (the run stopped early)
            self._stop_last()
        if self._prof is not None:
            self._closing = True
            self._prof.stop()
            self._prof = None

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.gc_seconds += time.perf_counter() - self._gc_start
            self._gc_start = None

    @staticmethod
    def _compiles() -> int:
        """Frames torch.compile has compiled so far (FlexAttention compiles its kernels; 0 if never imported)."""
        dynamo = sys.modules.get("torch._dynamo.utils")
        return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0

    def _allocator(self) -> dict[str, int]:
        if not self.cuda:
            return {}
        import torch

        stats = torch.cuda.memory_stats()
        return {k: int(stats.get(k, 0)) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}

    def mark(self, name: str) -> None:
        if self.sync or (name == "start" and self._profile_at == len(self.steps)):
            import torch

            if self.cuda:
                torch.cuda.synchronize()
        self.marks[name] = time.perf_counter()
        if name == "start" and self._profile_at == len(self.steps) and self._last_prof is None:
            from torch.profiler import ProfilerActivity, profile

            self._last_prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if self.cuda else [])])
            self._last_prof.start()
            self._last_t0 = time.perf_counter()

    def _stop_last(self) -> None:
        """End --profile-last's profiled step: its top ops, wall time and GPU time by kernel kind."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._last_t0
        prof, self._last_prof = self._last_prof, None
        # the profile is for finding; a failure in reading it must not lose the side's timed figures
        try:
            prof.stop()
            events = prof.key_averages()
            self._on_trace(prof)
            self.profiles[-1]["step"] = "after_timed"
            self.profiles[-1]["wall_ms"] = round(1e3 * wall, 2)
            if self.cuda:
                from torch.autograd import DeviceType

                rows = [(e.key, e.self_device_time_total / 1e3, e.count) for e in events
                        if e.device_type == DeviceType.CUDA]
                self.profiles[-1]["cuda_kernels"] = kernel_breakdown(rows, wall * 1e3)
        except Exception as exc:  # noqa: BLE001
            self.profiles.append({"step": "after_timed", "error": f"{type(exc).__name__}: {exc}"})

    def end(self, stamp: float) -> None:
        """Close the step that ended at ``stamp`` (the Timer's, taken after its synchronise)."""
        m, row = self.marks, {}
        if "start" in m and self._last_end is not None:
            row["data_s"] = m["start"] - self._last_end
        if "start" in m and "before_backward" in m:
            row["forward_s"] = m["before_backward"] - m["start"]
        if "after_backward" in m:
            row["forward_backward_s" if "before_backward" not in m else "backward_s"] = (
                m["after_backward"] - m.get("before_backward", m.get("start", m["after_backward"])))
            row["optimizer_s"] = stamp - m["after_backward"]
        row["gc_s"] = self.gc_seconds
        self.gc_seconds = 0.0
        compiled = self._compiles()
        row["compiles"] = compiled - self._compiled
        self._compiled = compiled
        counters = self._allocator()
        row.update({k: v - self._counters.get(k, 0) for k, v in counters.items()})
        self._counters = counters
        self.steps.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        self._last_end, self.marks = stamp, {}
        if self._prof is not None:
            self._prof.step()
        if self._last_prof is not None:
            self._stop_last()


def _pairs_layout(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(groups per step, responses per group, pairs per step)."""
    if spec["setting"] == "pairwise":
        return spec["pairs_per_step"], 2, spec["pairs_per_step"]
    return spec["groups_per_step"], K_GROUP, spec["groups_per_step"] * len(all_pairs(K_GROUP))


# -- vpa worker ----------------------------------------------------------------------------------
def run_vpa(spec: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from vpa_lightning.callbacks import GarbageCollection, flop_params
    from vpa_lightning.data.datamodule import GroupCollator, PreferenceExample
    from vpa_lightning.losses import DPOLoss
    from vpa_lightning.models.logps import PreferenceGroup
    from vpa_lightning.module import VisionDPOModule

    torch.manual_seed(0)
    g_step, k, pairs_per_step = _pairs_layout(spec)
    n_steps = spec["warmup"] + spec["steps"] + (1 if spec.get("profile_last") else 0)
    pairs = [(0, 1)] if k == 2 else all_pairs(k)
    examples = [
        PreferenceExample(
            key=g["key"],
            group=PreferenceGroup(image=g["image"], prompt=g["prompt"], responses=g["responses"], id=g["key"]),
            pairs=list(pairs),
            probability=[math.nan] * len(pairs),
            margin=[math.nan] * len(pairs),
        )
        for g in make_groups(g_step * n_steps, k, spec["image_size"], seed=spec["data_seed"])
    ]
    module = VisionDPOModule(
        spec["model_dir"],
        loss=DPOLoss(beta=BETA),
        lora=not spec.get("full_finetune"),
        lora_r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        learning_rate=LR,
        warmup_ratio=0.0,
        gradient_checkpointing=spec["gradient_checkpointing"],
        dtype="bfloat16" if spec.get("bf16_weights") else None,
        prefix_sharing=spec["mode"].split("+")[0] == "prefix_sharing",
        packed=spec["mode"].split("+")[0] == "packed",
        compile_layers=spec["mode"].endswith("+compile"),
    )
    loader = DataLoader(
        examples,
        batch_size=g_step,
        shuffle=False,
        collate_fn=GroupCollator(module.processor, max_length=spec["max_length"]),
        num_workers=0,
    )

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.loss0: float | None = None
            self.rows: list[int] = []
            self.tokens: list[float] = []
            self.flop_tokens: list[float] = []
            self.attn_pairs: list[float] = []
            self.phases = _Phases(spec)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.phases.mark("start")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self.phases.mark("before_backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self.phases.mark("after_backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.phases.end(self.stamps[-1])
            self.rows.append(int(batch["inputs"].labels.shape[0]))
            self.tokens.append(float(batch["inputs"].model_inputs["attention_mask"].sum()))
            self.flop_tokens.append(float(pl_module.forward_tokens(batch)))
            self.attn_pairs.append(float(vpa_attention_pairs(batch["inputs"], pl_module.packed or pl_module.prefix_sharing)))
            if self.loss0 is None:
                self.loss0 = float(outputs["loss"].detach())

    timer = Timer()
    trainer = pl.Trainer(
        accelerator="gpu" if spec["device"] == "cuda" else "cpu",
        devices=1,
        precision=spec.get("precision", "32-true"),
        max_steps=n_steps,
        max_epochs=1,
        gradient_clip_val=MAX_GRAD_NORM,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer, GarbageCollection()],  # vpa fit's default
    )
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    spec["_rss_before"] = _rss_mib()
    trainer.fit(module, train_dataloaders=loader)
    timer.phases.close()
    seqs = timer.rows[spec["warmup"]] if len(timer.rows) > spec["warmup"] else None
    return _finish(
        spec,
        timer.stamps,
        timer.loss0,
        pairs_per_step,
        {
            "how": "lightning.Trainer.fit(VisionDPOModule) over DataLoader(GroupCollator)",
            "sequences_per_forward": seqs,
            "forwards_per_step": "1 reference (no grad) + 1 policy (grad), each over all distinct responses",
            "phases": timer.phases.steps,
            **({"profile": timer.phases.profiles} if spec.get("profile") or spec.get("profile_last") else {}),
        },
        timer.tokens,
        timer.flop_tokens,
        flop_params(module),
        timer.attn_pairs,
    )


# -- TRL worker ----------------------------------------------------------------------------------
def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from vpa_lightning.callbacks import flop_params

    torch.manual_seed(0)
    g_step, k, pairs_per_step = _pairs_layout(spec)
    n_steps = spec["warmup"] + spec["steps"] + (1 if spec.get("profile_last") else 0)
    pairs = [(0, 1)] if k == 2 else all_pairs(k)
    rows = []
    for g in make_groups(g_step * n_steps, k, spec["image_size"], seed=spec["data_seed"]):
        for c, j in pairs:  # one row per pair: each response is recomputed for every pair it is in
            rows.append(
                {
                    "images": [g["image"]],
                    "prompt": [{"role": "user", "content": g["prompt"]}],
                    "chosen": [{"role": "assistant", "content": g["responses"][c]}],
                    "rejected": [{"role": "assistant", "content": g["responses"][j]}],
                }
            )
    dataset = Dataset.from_list(rows)
    model = AutoModelForImageTextToText.from_pretrained(
        spec["model_dir"], **({"dtype": torch.bfloat16} if spec.get("bf16_weights") else {}))
    if spec.get("full_finetune"):  # the language model trains, the vision side stays frozen (vpa's freeze_vision)
        from vpa_lightning.models.lora import language_and_vision_modules

        for name in language_and_vision_modules(model)[1]:
            model.get_submodule(name).requires_grad_(False)
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    peft_config = LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=spec["lora_targets"], task_type="CAUSAL_LM"
    )
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        report_to="none",
        use_cpu=spec["device"] != "cuda",
        bf16=spec.get("precision") == "bf16-mixed",
        fp16=False,
        activation_checkpointing=spec["gradient_checkpointing"],
        activation_checkpointing_kwargs={"use_reentrant": False} if spec["gradient_checkpointing"] else None,
        per_device_train_batch_size=pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=n_steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=MAX_GRAD_NORM,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=spec["max_length"],
        precompute_ref_log_probs=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        train_sampling_strategy="sequential",  # same batches, in the same order, as vpa
        logging_first_step=True,
        logging_steps=10**9,
        save_strategy="no",
        eval_strategy="no",
        seed=0,
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.loss0: float | None = None
            self.phases = _Phases(spec)

        def on_step_begin(self, args, state, control, **kwargs):
            self.phases.mark("start")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.phases.mark("after_backward")

        def on_step_end(self, args, state, control, **kwargs):
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.phases.end(self.stamps[-1])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.loss0 is None and logs and "loss" in logs:
                self.loss0 = float(logs["loss"])

    timer = Timer()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=None if spec.get("full_finetune") else peft_config,  # full fine-tuning: TRL copies a reference
        callbacks=[timer],
    )
    # sequences per forward: the collator's batch of 2 x pairs rows; the tokens of every step's batch (sequential
    # sampling: step i trains rows i*pairs .. (i+1)*pairs-1)
    batches = [trainer.data_collator([dict(r) for r in rows[i * pairs_per_step : (i + 1) * pairs_per_step]])
               for i in range(n_steps)]
    seqs = int(batches[0]["input_ids"].shape[0])
    tokens = [float(b["attention_mask"].sum()) for b in batches]
    pairs = [float(attention_pairs(b["attention_mask"].sum(dim=1).tolist())) for b in batches]
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    spec["_rss_before"] = _rss_mib()
    trainer.train()
    timer.phases.close()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return _finish(
        spec,
        timer.stamps,
        timer.loss0,
        pairs_per_step,
        {
            "how": "trl.DPOTrainer.train() (peft_config LoRA, adapters disabled for the reference)",
            "sequences_per_forward": seqs,
            "forwards_per_step": "1 reference (no grad) + 1 policy (grad), each over chosen+rejected of every pair",
            "phases": timer.phases.steps,
            **({"profile": timer.phases.profiles} if spec.get("profile") or spec.get("profile_last") else {}),
        },
        tokens,
        tokens,
        flop_params(trainer.model),
        pairs,
    )


# -- driver --------------------------------------------------------------------------------------
def _worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = (run_trl if spec["side"] == "trl" else run_vpa)(spec)
    Path(spec["out"]).write_text(json.dumps(result))


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    spec = {**spec, "out": out}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if spec["side"] != "trl":  # as `vpa fit` runs: expandable segments unless the user configured the allocator
        from vpa_lightning.cli import allocator_defaults

        allocator_defaults(env)
    proc = subprocess.run(
        [sys.executable, __file__, "--_worker", json.dumps(spec)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{spec['side']} / {spec['setting']} worker failed (exit {proc.returncode})")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "lightning", "datasets", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and setting (best kept)")
    parser.add_argument("--pairs-per-step", type=int, default=8, help="pairwise setting: pairs per optimizer step")
    parser.add_argument("--groups-per-step", type=int, default=2, help="groups setting: 4-response groups per step")
    parser.add_argument("--image-size", type=int, default=224, help="image side (patch 14: (size/14)^2 image tokens)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--settings", default="pairwise,groups")
    parser.add_argument("--prefix-sharing", action="store_true",
                        help="shorthand for --vpa-modes prefix_sharing (image + prompt once per group, KV cache)")
    parser.add_argument("--vpa-modes", default="plain",
                        help="comma list of vpa group modes run side by side with TRL: plain, packed, prefix_sharing; "
                             "MODE+compile: the same with --model.compile_layers (each transformer block compiled)")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES),
                        help="model widths/depths: small (CPU default) or llava7b-2l (LLaVA-1.5-7B widths, 2 text layers)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                        help="both sides: float32, or bf16 autocast (Lightning bf16-mixed / TRL bf16=True)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="gradient checkpointing on both sides (non-reentrant)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "both"],
                        help="auto = cpu, plus cuda when available")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/trainer_vs_trl.json"))
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per worker run")
    parser.add_argument("--profile", action="store_true",
                        help="run torch's profiler over every step and keep each step's top ops (self CPU and CUDA "
                             "time) in the JSON; slows the steps, so its figures are for finding, not for comparing")
    parser.add_argument("--profile-last", action="store_true",
                        help="run one more step after the timed ones under torch's profiler (the timed steps run "
                             "without it) and keep its top ops, wall time and, on CUDA, its GPU time by kernel kind "
                             "(GEMM, attention, copies, other) and how busy the GPU was")
    parser.add_argument("--phases", action="store_true",
                        help="synchronise the GPU at each phase mark (data, forward, backward, optimizer) so the "
                             "per-step phase times in the JSON are exact; CPU runs need no synchronising")
    parser.add_argument("--full-finetune", action="store_true",
                        help="train every weight of the language model on both sides (vision frozen; the reference a "
                             "frozen copy) instead of LoRA")
    parser.add_argument("--skip-trl", action="store_true",
                        help="run vpa's sides only (e.g. a batch TRL cannot hold without gradient checkpointing): MFU, "
                             "step times and memory, no ratios")
    parser.add_argument("--model-dir", default=None,
                        help="build the model into this folder once and reuse it in later runs of the same --shape and "
                             "--image-size (kept at the end); default: a temporary folder, deleted at the end")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        _worker_main(args._worker)
        return
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    shape = {**DEFAULT_SHAPE, **SHAPES[args.shape]}
    n_image = image_tokens(shape, args.image_size)
    if args.max_length < n_image + 64:  # else both sides truncate or skip every sample
        parser.error(f"--max-length {args.max_length} leaves too little room beside the "
                     f"{n_image} image tokens of --image-size {args.image_size}")

    import torch

    from vpa_lightning.module import default_lora_targets

    if args.device == "auto" or args.device == "both":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("CUDA is not available")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    modes = ["prefix_sharing"] if args.prefix_sharing else [m.strip() for m in args.vpa_modes.split(",") if m.strip()]
    unknown = {m for m in modes if m.removesuffix("+compile") not in ("plain", "packed", "prefix_sharing")}
    if unknown:
        parser.error(f"--vpa-modes: unknown {sorted(unknown)}")
    if args.gradient_checkpointing and any(m.startswith("prefix_sharing") for m in modes):
        print("note: vpa:prefix_sharing runs on the KV cache, which gradient checkpointing cannot recompute: "
              "it runs without checkpointing (the other sides with)")
    vpa_sides = [f"vpa:{m}" for m in modes]

    t_start = time.perf_counter()
    # --model-dir: built once, reused by later runs of the same shape and image size (a 7B build + save is ~30 s)
    built_for = {"shape": args.shape, "image_size": args.image_size}
    if args.model_dir:
        model_dir = args.model_dir
        marker = Path(model_dir) / "vpa_benchmark_model.json"
        if not marker.exists() or json.loads(marker.read_text()) != built_for:
            if Path(model_dir).exists() and any(Path(model_dir).iterdir()):
                if not marker.exists():
                    parser.error(f"--model-dir {model_dir}: not empty and not a folder this benchmark built")
                shutil.rmtree(model_dir)  # ours (the marker says so), of another shape: no stale shard left in it
            build_model(model_dir, args.image_size, shape=SHAPES[args.shape], device="cuda" if "cuda" in devices else "cpu")
            marker.write_text(json.dumps(built_for))
        else:
            print(f"model: reusing {model_dir}")
    else:
        model_dir = tempfile.mkdtemp(prefix="vpa-vs-trl-model-")
        build_model(model_dir, args.image_size, shape=SHAPES[args.shape], device="cuda" if "cuda" in devices else "cpu")
    if "cuda" in devices:  # the workers need the memory this process's allocator would keep cached
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):  # names and sizes only
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    lora_targets = default_lora_targets(model)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    print(f"model: {shape['family']} ({args.image_size}px: {n_image} image tokens, "
          f"shape {args.shape}), {n_params / 1e6:.2f} M parameters; LoRA targets {lora_targets}")

    results: dict[str, Any] = {}
    raw: dict[str, dict[str, list[dict]]] = {}  # every run of every side, as it finishes

    def write_report(final: bool) -> None:
        """The JSON, rewritten (atomically) after every run: a run cut short by a time limit keeps what it measured."""
        report = {
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "devices": devices,
            "device_names": {
                "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
                **({"cuda": torch.cuda.get_device_name(0)} if "cuda" in devices else {}),
            },
            "torch_threads": torch.get_num_threads(),
            "versions": _versions(),
            "model": {
                "family": shape["family"],
                "parameters": n_params,
                "image_tokens": n_image,
                "shape": args.shape,
                **SHAPES[args.shape],
                "lora": None if args.full_finetune else {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0,
                                                     "target_modules": lora_targets},
            },
            "training": {"beta": BETA, "loss": "sigmoid", "lr": LR, "optimizer": "AdamW", "max_grad_norm": MAX_GRAD_NORM,
                         "dtype": "float32" if args.precision == "32-true" else "bf16 autocast",
                         "weights": "bf16" if shape.get("bf16_weights") else "float32", "precision": args.precision,
                         "gradient_checkpointing": args.gradient_checkpointing, "logps": "summed",
                         "vpa_modes": modes},
            "results": results,
            "failures": failures,
            "wall_seconds": time.perf_counter() - t_start,
        }
        report["complete"] = final
        report["runs"] = raw
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)

    failures: list[str] = []
    for device in devices:
        for setting in settings:
            sides = [*vpa_sides, *([] if args.skip_trl else ["trl"])]
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for rep in range(args.repeats):
                order = sides if rep % 2 == 0 else sides[::-1]
                for side in order:
                    spec = {
                        "side": side,
                        "mode": side.split(":", 1)[1] if side != "trl" else None,
                        "gradient_checkpointing": args.gradient_checkpointing and not side.startswith("vpa:prefix_sharing"),
                        "setting": setting,
                        "device": device,
                        "model_dir": model_dir,
                        "lora_targets": lora_targets,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "pairs_per_step": args.pairs_per_step,
                        "groups_per_step": args.groups_per_step,
                        "image_size": args.image_size,
                        "max_length": args.max_length,
                        "data_seed": 1234,
                        "text_hidden": shape["text_hidden"],
                        "text_layers": shape["text_layers"],
                        "precision": args.precision,
                        "phases": args.phases,
                        "profile": args.profile,
                        "profile_last": args.profile_last and not args.profile,
                        "bf16_weights": bool(SHAPES[args.shape].get("bf16_weights")),
                        "full_finetune": args.full_finetune,
                    }
                    try:
                        r = _spawn(spec, args.timeout)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # recorded; the other sides still run
                        why = f"timed out after {args.timeout:.0f} s" if isinstance(exc, subprocess.TimeoutExpired) else exc
                        failures.append(f"{device}/{setting} {side} run {rep + 1}: {why}")
                        print(f"[{device}/{setting}] {side:18s} run {rep + 1}: FAILED ({why})", flush=True)
                        continue
                    runs[side].append(r)
                    raw.setdefault(f"{device}/{setting}", {}).setdefault(side, []).append(r)
                    write_report(final=False)
                    print(f"[{device}/{setting}] {side:18s} run {rep + 1}: {r['pairs_per_s']:.3f} pairs/s, "
                          f"peak {r['peak_memory_mib']:.0f} MiB, step-0 loss {r['loss_step0']:.4f}, "
                          f"{r['sequences_per_forward']} sequences/forward", flush=True)
            best = {side: max(rs, key=lambda r: r["pairs_per_s"]) for side, rs in runs.items() if rs}
            if "trl" not in best:  # vpa alone (--skip-trl) or TRL failed: no ratios
                for side in best:
                    best[side]["tokens_per_s"] = best[side]["tokens_per_step"] * best[side]["pairs_per_s"] / best[side]["pairs_per_step"]
                if best:
                    results[f"{device}/{setting}"] = {
                        "pairs_per_step": next(iter(best.values()))["pairs_per_step"],
                        "gradient_checkpointing": args.gradient_checkpointing,
                        **{side: {**best[side], "all_pairs_per_s": [r["pairs_per_s"] for r in runs[side]]} for side in best},
                        "throughput_ratio_over_trl": {}, "peak_memory_ratio_over_trl": {},
                        **({"target_mfu": 0.4} if device == "cuda" else {}),
                    }
                continue
            trl = best["trl"]
            ran = [s for s in vpa_sides if s in best]
            # tokens/s of the data, counted the same way for every side: the pairs trained per second times TRL's
            # tokens per pair (its chosen + rejected sequences, prompt and image tokens included); its ratio
            # to TRL is the pairs/s ratio. processed_tokens_per_s is what each side ran through the model.
            tokens_per_pair = trl["tokens_per_step"] / trl["pairs_per_step"]
            for side in best:
                best[side]["tokens_per_s"] = best[side]["pairs_per_s"] * tokens_per_pair
            entry = {
                "pairs_per_step": trl["pairs_per_step"],
                "gradient_checkpointing": args.gradient_checkpointing,
                **{side: {**best[side], "all_pairs_per_s": [r["pairs_per_s"] for r in runs[side]],
                          "all_peak_memory_mib": [r["peak_memory_mib"] for r in runs[side]]} for side in best},
                "throughput_ratio_over_trl": {s: best[s]["pairs_per_s"] / trl["pairs_per_s"] for s in ran},
                "peak_memory_ratio_over_trl": {s: best[s]["peak_memory_mib"] / trl["peak_memory_mib"] for s in ran},
                # CPU targets (#15): 1.5x pairs, 5x groups; on the GPU check: 2x TRL's tokens/s on pairs, MFU >= 40%
                "target_throughput_ratio": (2.0 if device == "cuda" else 1.5) if setting == "pairwise" else 5.0,
                **({"target_mfu": 0.4} if device == "cuda" else {}),
            }
            entry["step0_loss_matches_ln2"] = all(abs(best[s]["loss_step0"] - math.log(2)) < 1e-3 for s in best)
            results[f"{device}/{setting}"] = entry

    mem_name = {"cpu": "peak RSS", "cuda": "peak CUDA alloc"}
    print()
    header = (f"{'device/setting':18s} {'side':18s} {'pairs/step':>10s} {'pairs/s':>9s} {'tokens/s':>9s} {'x TRL':>6s} "
              f"{'MFU':>6s} {'MiB':>7s} {'mem/TRL':>7s} {'seq':>5s} {'loss0':>7s} {'max/med':>7s}")
    print(header)
    print("-" * len(header))
    for key, e in results.items():
        for side in [s for s in [*vpa_sides, "trl"] if s in e]:
            v = e[side]
            ratio = e["throughput_ratio_over_trl"].get(side, 1.0 if side == "trl" else math.nan)
            mem = e["peak_memory_ratio_over_trl"].get(side, 1.0 if side == "trl" else math.nan)
            mfu = f"{100 * v['mfu']:.1f}%" if v.get("mfu") is not None else "-"
            print(f"{key:18s} {side:18s} {e['pairs_per_step']:>10d} {v['pairs_per_s']:>9.3f} {v['tokens_per_s']:>9.0f} "
                  f"{ratio:>5.2f}x {mfu:>6s} {v['peak_memory_mib']:>7.0f} {mem:>7.2f} "
                  f"{v['sequences_per_forward']!s:>5s} {v['loss_step0']:>7.4f} {v['max_over_median_step']:>7.2f}")
    print(f"(memory = {', '.join(mem_name[d] for d in devices)}; seq = sequences per forward pass, "
          f"2 forwards per step on both sides: reference no-grad + policy with grad; ln 2 = {math.log(2):.4f};\n"
          " tokens/s = pairs/s x TRL's tokens per pair; MFU = model FLOPs of what each side runs (6N + 2N_trainable per "
          "token run: policy forward, backward to the activations, reference forward; plus 16 d x layers per attended "
          "(query, key) pair) over the dense bf16 peak, CUDA only; max/med = slowest timed step over the median)")

    write_report(final=True)  # before the model's folder goes (a 7B model is 14 GB to delete under a time limit)
    print(f"wrote {args.json}")
    if not args.model_dir:
        shutil.rmtree(model_dir, ignore_errors=True)
    if failures:  # the figures that ran are written; the exit status says that some did not
        sys.exit("failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
