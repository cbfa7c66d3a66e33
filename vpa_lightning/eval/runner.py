"""Evaluation run: every model answers every benchmark item (greedy), benchmarks score the answers.

Model sources (:class:`ModelSpec`): a ``tiny:`` model or local Hugging Face folder (base or merged
model), optionally with a PEFT adapter folder on top, or a Lightning checkpoint of
:class:`~vpa_lightning.module.VisionDPOModule`. Models are loaded one at a time (and freed), the
benchmarks' items and images are loaded once before the first model.

Output in ``out_dir``:

* ``results.json``: ``{"models": {model: {benchmark: {metric: value}}}, "rejects": {benchmark:
  [reject dicts]}, "counts": {benchmark: {"lines", "items", "rejected"}}}`` (written atomically).
* ``answers/<model>/<benchmark>.jsonl``: ``item_id``, ``question``, ``answer``, ``parsed`` (from the
  benchmark's optional ``parse(item, answer)`` method, else ``null``).

Video items (``item.video``, an :class:`~vpa_lightning.eval.video.EvalVideo`) are decoded a batch at a time
while their model answers (never a benchmark's clips all at once), sampled at ``video_fps`` /
``video_max_frames`` / ``video_max_pixels``; a video that fails to decode rejects its item (for every model).
A model whose family takes no video stops the run before it answers anything
(:class:`~vpa_lightning.errors.VideoUnsupportedError`, naming the model types that do); models given by
``path`` are checked by their processor before the first model loads.

The runner relies on the :class:`~vpa_lightning.eval.base.Benchmark` contract only, so
judge-scored benchmarks work too. Optional attributes it uses when present: ``display_name``
(results key; default ``name``), ``parse``, ``file``, and items' ``meta["group"]`` / ``meta["line"]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpa_lightning._io import write_text_atomic
from vpa_lightning.eval.base import Benchmark, EvalItem, Reject

__all__ = ["ModelSpec", "evaluate", "format_table", "load_model"]


@dataclass
class ModelSpec:
    """One model to evaluate.

    Args:
        name: Column name in the results (unique; also the answers sub-folder).
        path: ``tiny:llava`` / ``tiny:qwen2_vl`` / ``tiny:idefics3``, or a local Hugging Face folder
            (a base model or an exported ``merged/`` one). Not used with ``checkpoint``.
        adapter: A PEFT adapter folder (e.g. an exported ``adapter/``) loaded on top of ``path``.
        checkpoint: A Lightning ``.ckpt`` of ``VisionDPOModule`` (its base model is rebuilt from
            the ``model_name_or_path`` stored in it).
        dtype: Weight dtype for ``path``: ``None`` (float32), ``auto``, ``bfloat16``, ``float16``, ``float32``.
    """

    name: str
    path: str | None = None
    adapter: str | None = None
    checkpoint: str | None = None
    dtype: str | None = None

    def check(self) -> None:
        """Raise ``ValueError`` for an inconsistent spec."""
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(
                f"model name must be a non-empty folder name, got {self.name!r}"
            )
        if (self.path is None) == (self.checkpoint is None):
            raise ValueError(
                f"model {self.name!r}: give exactly one of path or checkpoint"
            )
        if self.adapter is not None and self.path is None:
            raise ValueError(
                f"model {self.name!r}: adapter needs path (the base model)"
            )


def as_spec(spec: ModelSpec | dict[str, Any]) -> ModelSpec:
    out = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
    out.check()
    return out


def load_model(spec: ModelSpec, seed: int = 0, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, processor)`` of ``spec``, in eval mode on ``device``."""
    if spec.checkpoint is not None:
        from vpa_lightning.export import load_module

        module = load_module(spec.checkpoint)
        model, processor = module.model, module.processor
    else:
        from vpa_lightning.models.loading import load_vlm

        model, processor = load_vlm(str(spec.path), seed=seed, dtype=spec.dtype)
        if spec.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec.adapter)
    return model.to(device).eval(), processor


def _resolve_device(device: str) -> str:
    import torch

    return (
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )


def _bench_name(bench: Benchmark) -> str:
    return str(
        getattr(bench, "display_name", None) or bench.name or type(bench).__name__
    )


def _group(item: EvalItem) -> str:
    return str(item.meta.get("group", item.item_id))


def _limit(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """Items of the first ``limit`` groups (a group = a question with its rotations / image pair)."""
    if limit is None:
        return items
    keep: set[str] = set()
    out = []
    for it in items:
        g = _group(it)
        if g not in keep:
            if len(keep) >= limit:
                continue
            keep.add(g)
        out.append(it)
    return out


def _load_images(
    bench: Benchmark, items: list[EvalItem], cache: dict[Path, Any]
) -> tuple[list[EvalItem], list[Any], list[Reject]]:
    """RGB images of ``items`` (shared ``cache`` by path); an image that fails to load rejects its item."""
    from PIL import Image

    kept, images, rejects = [], [], []
    for i, it in enumerate(items):
        if it.image is None:  # a video (or text-only) item
            kept.append(it)
            images.append([])
            continue
        path = Path(it.image)
        if path not in cache:
            try:
                with Image.open(path) as im:
                    cache[path] = im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
                cache[path] = e
        img = cache[path]
        if isinstance(img, Exception):
            file = str(it.meta.get("file", getattr(bench, "file", _bench_name(bench))))
            rejects.append(
                Reject(
                    file,
                    int(it.meta.get("line", i + 1)),
                    f"image failed to load: {type(img).__name__}: {img}",
                )
            )
            continue
        kept.append(it)
        images.append(img)
    return kept, images, rejects


def _has_video(items: list[EvalItem]) -> bool:
    return any(it.video is not None for it in items)


def _check_video_specs(specs: list[ModelSpec], what: str) -> None:
    """Refuse, before any model loads, a model given by ``path`` whose processor takes no video."""
    from vpa_lightning.models.families import family_of
    from vpa_lightning.models.loading import load_processor

    for i, spec in enumerate(specs):
        if spec.path is not None:  # a checkpoint's base model is known once it loads: checked then
            processor = load_processor(spec.path)
            family_of(processor).check_video(processor, f"--models[{i}] {spec.name}: {what}",
                                                     "Evaluate one of them (--models), or drop the video benchmarks")


def _answer_videos(
    model: Any,
    processor: Any,
    bench: Benchmark,
    items: list[EvalItem],
    images: list[Any],
    sampling: Any,
    failed: dict[str, Reject],
    batch_size: int,
    max_new_tokens: int,
    video_max_pixels: int | None,
) -> tuple[list[EvalItem], list[str]]:
    """``(answered items, answers)``: the clips decoded one batch at a time, each batch answered before the next
    is decoded; an item whose video fails to decode goes to ``failed`` (by id) and is skipped by later models."""
    from vpa_lightning.data.samples import SampleError
    from vpa_lightning.models.generation import generate_answers

    def batches() -> Any:
        chunk: list[tuple[EvalItem, Any, Any]] = []
        for i, (it, image) in enumerate(zip(items, images)):
            if it.item_id in failed:
                continue
            clip = None
            if it.video is not None:
                try:
                    clip = it.video.load(sampling)
                except SampleError as e:
                    file = str(it.meta.get("file", getattr(bench, "file", _bench_name(bench))))
                    failed[it.item_id] = Reject(file, int(it.meta.get("line", i + 1)), f"video failed to load: {e}")
                    continue
            chunk.append((it, image, clip))
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    kept: list[EvalItem] = []
    answers: list[str] = []
    for chunk in batches():
        answers.extend(
            generate_answers(
                model,
                processor,
                [image for _, image, _ in chunk],
                [it.question for it, _, _ in chunk],
                max_new_tokens=max_new_tokens,
                batch_size=len(chunk),
                videos=[None if clip is None else [clip] for _, _, clip in chunk],
                video_max_pixels=video_max_pixels,
            )
        )
        kept.extend(it for it, _, _ in chunk)
    return kept, answers


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Side-by-side table: rows ``benchmark/metric``, one column per model, then ``Δ <model>`` vs the first."""
    models = list(results)
    if not models:
        return ""
    rows: list[str] = []
    for m in models:  # union of row keys, first-seen order
        for bench, metrics in results[m].items():
            rows.extend(f"{bench}/{k}" for k in metrics if f"{bench}/{k}" not in rows)
    header = ["metric", *models, *(f"Δ {m}" for m in models[1:])]
    body = []
    for row in rows:
        bench, metric = row.split("/", 1)
        vals = [results[m].get(bench, {}).get(metric) for m in models]
        deltas = [
            None if v is None or vals[0] is None else v - vals[0] for v in vals[1:]
        ]
        body.append(
            [
                row,
                *(_fmt(v) for v in vals),
                *(("-" if d is None else f"{d:+.4f}") for d in deltas),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate(
    models: list[ModelSpec | dict[str, Any]],
    benchmarks: list[Benchmark],
    out_dir: str | os.PathLike[str],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    seed: int = 0,
    limit: int | None = None,
    device: str = "auto",
    print_table: bool = True,
    video_fps: float | None = 2.0,
    video_max_frames: int | None = 16,
    video_max_pixels: int | None = None,
) -> dict[str, Any]:
    """Evaluate every model on every benchmark; write ``results.json`` and the answers; return the results.

    Args:
        models: Model specs (:class:`ModelSpec` or dicts of its fields); names must be unique.
        benchmarks: Benchmark instances; result keys are their ``display_name`` (else ``name``),
            suffixed ``_2``, ``_3`` ... when repeated.
        out_dir: Output folder.
        batch_size: Generation batch size.
        max_new_tokens: Greedy generation length.
        seed: ``torch.manual_seed`` before each model's generation; also the init seed of ``tiny:`` models.
        limit: At most this many questions per benchmark (an MME image's questions and an MMBench
            question's rotations count once and stay together).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` ...
        print_table: Print the side-by-side table.
        video_fps: Frames per second sampled from a video item's video (``None``: every frame).
        video_max_frames: At most this many frames per video, evenly spaced (``None``: no limit).
        video_max_pixels: Pixels per frame at most (larger frames are scaled down; ``None``: the
            processor's own limit).
    """
    import gc

    import torch

    from vpa_lightning.models.generation import generate_answers

    specs = [as_spec(m) for m in models]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    dev = _resolve_device(device)
    out = Path(out_dir)

    # items and images once, before any model
    loaded: list[tuple[str, Benchmark, list[EvalItem], list[Any]]] = []
    rejects: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    cache: dict[Path, Any] = {}
    for bench in benchmarks:
        key = base = _bench_name(bench)
        n = 2
        while key in counts:
            key, n = f"{base}_{n}", n + 1
        items, bad = bench.load()
        lines = len({(it.meta.get("line"), _group(it)) for it in items}) + len(bad)
        items = _limit(items, limit)
        items, images, bad_images = _load_images(bench, items, cache)
        all_bad = [*bad, *bad_images]
        rejects[key] = [r.to_dict() for r in all_bad]
        counts[key] = {"lines": lines, "items": len(items), "rejected": len(all_bad)}
        loaded.append((key, bench, items, images))

    video_benches = [key for key, _, items, _ in loaded if _has_video(items)]
    sampling = None
    if video_benches:
        from vpa_lightning.data.video import VideoSampling
        from vpa_lightning.models.families import family_of

        sampling = VideoSampling(fps=video_fps, max_frames=video_max_frames, max_pixels=video_max_pixels)
        what = f"benchmark {video_benches[0]} has videos"
        _check_video_specs(specs, what)
    failed: dict[str, dict[str, Reject]] = {key: {} for key, _, _, _ in loaded}

    results: dict[str, dict[str, dict[str, float]]] = {}
    for i, spec in enumerate(specs):
        model, processor = load_model(spec, seed=seed, device=dev)
        if video_benches:  # before any answer: a checkpoint's family is known only now
            family_of(processor).check_video(processor, f"--models[{i}] {spec.name}: {what}",
                                                     "Evaluate one of them (--models), or drop the video benchmarks")
        results[spec.name] = {}
        for key, bench, items, images in loaded:
            if not items:
                results[spec.name][key] = {}
                continue
            torch.manual_seed(seed)
            if key in video_benches:
                items, answers = _answer_videos(
                    model, processor, bench, items, images,
                    family_of(processor).video_sampling(sampling) if sampling is not None else None, failed[key],
                    batch_size, max_new_tokens, video_max_pixels,
                )
                if not items:
                    results[spec.name][key] = {}
                    continue
            else:
                answers = generate_answers(
                    model,
                    processor,
                    images,
                    [it.question for it in items],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                )
            results[spec.name][key] = {
                k: float(v) for k, v in bench.score(items, answers).items()
            }
            parse = getattr(bench, "parse", None)
            rows = [
                {
                    "item_id": it.item_id,
                    "question": it.question,
                    "answer": a,
                    "parsed": parse(it, a) if parse else None,
                }
                for it, a in zip(items, answers)
            ]
            write_text_atomic(
                out / "answers" / spec.name / f"{key}.jsonl",
                "".join(json.dumps(r) + "\n" for r in rows),
            )
        del model, processor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    for key, bad in failed.items():  # videos that failed to decode, once per item whatever the models
        rejects[key].extend(r.to_dict() for r in bad.values())
        counts[key]["items"] -= len(bad)
        counts[key]["rejected"] += len(bad)

    report = {"models": results, "rejects": rejects, "counts": counts}
    write_text_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    if print_table:
        print(format_table(results))
    return report
