"""SeVa self-generated preference pairs (arXiv 2404.10501) written as ``vpa-shard`` shards.

The policy answers every unlabeled image + question greedily twice: once on the original image
(``chosen``) and once on an augmented copy (``rejected``, by default diffusion noise at step 500).
The answers become pairwise JSONL rows ``{"image", "question", "chosen", "rejected"}`` whose image
is the ORIGINAL image; the Rust writer (:func:`vpa_lightning.data.build`) then validates them,
drops pairs whose two answers are identical (``pairs_dropped_identical`` in the manifest) and
writes WebDataset shards that :class:`~vpa_lightning.data.datamodule.PreferenceDataModule` reads.

Where the augmentation is applied: to the processor's normalised ``pixel_values``, through
:func:`vpa_lightning.augment.pixels.corrupt_pixel_values` (``[B, C, H, W]`` images, Idefics3
crops, and Qwen2-VL's flattened patches, which are unpatchified, corrupted and patchified back).
This is what SeVa does (diffusion noise is added to the preprocessed tensor the vision tower
sees), it keeps the text inputs (image-token count, prompt) byte-identical between the two
passes, so the only difference between the two answers is the image, and it costs one processor
call per batch. Colour / geometric ops that need ``[0, 1]`` pixels run on denormalised pixels.

Prompts (``prompts_file``):

* a LLaVA-665k-style JSON list ``[{"id", "image", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, ...]}, ...]`` - the first human turn, without ``<image>``, is the
  question; entries without an image are rejected;
* JSONL rows ``{"image", "question"}`` (``"id"`` optional).

Video prompts (for a policy that takes video: Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video): a ``video`` or ``videos``
field as ``vpa-shard build`` reads it (one video or a list of them; a video is a video file's path, a frame
folder's path, or a list of frame image paths), relative to ``image_root``, with or without an image; ``<video>`` placeholders are removed (the videos go
first, as the build puts a prompt without placeholders). The rejected answer is generated on the augmented clip:
**every frame gets the same augmentation** (the same random parameters and noise,
:func:`vpa_lightning.augment.pixels.corrupt_clip`), applied to the processor's ``pixel_values_videos`` as images
are. The pair rows keep the video field as given, so the shards of every round hold the videos. Videos are
decoded as ``video_fps`` / ``video_max_frames`` / ``video_max_pixels`` say (the trainer's defaults: 2 fps, at most
16 frames); one that cannot be decoded rejects its prompt with the reason.

A ``.json`` file (or any file whose first non-blank character is ``[``) is read as the JSON list,
anything else as JSONL. A prompt whose image is missing or cannot be decoded, or whose row is
malformed, is rejected with a reason (``line N`` / ``id X``) and counted; it never stops the run.

Multiple ranks (``rank`` / ``world_size``): rank ``r`` answers prompts ``i`` with
``i % world_size == r`` and writes ``out_dir/pairs-rank{r}.jsonl`` (atomically, by rename). For
``world_size > 1`` every rank then waits until all ``pairs-rank*.jsonl`` files exist (a file
barrier, ``barrier_timeout`` seconds) and builds partition ``r/N`` of ALL ranks' pair files into
``out_dir/rank{r}/`` (same inputs and options on every rank, as ``vpa-shard merge`` requires).
Join them with ``vpa-shard merge OUT/rank0 OUT/rank1 ... --out OUT`` (or
:func:`vpa_lightning.data.merge`), which writes one ``manifest.json`` that lists every rank's
shards. With ``world_size == 1`` the shards go to ``out_dir/rank0/`` as a plain build (its own
``manifest.json``; nothing to merge).

Counts (returned and written to ``out_dir/seva-rank{r}.json``): ``prompts_in``, ``rejected``
(``rejected_reasons`` lists each), ``generated`` (prompts answered twice),
``rejected_by_build`` (rows the Rust writer rejected, e.g. an empty answer), ``identical_dropped``
(the manifest's ``pairs_dropped_identical``) and ``pairs_written`` (the manifest's ``pairs``).
For one rank and distinct (image, question) prompts
``prompts_in == rejected + rejected_by_build + identical_dropped + pairs_written``
(a repeated prompt is merged into the first one's group and counted as ``deduplicated``);
with several ranks the build counts are the partition's share, and the identity holds for the
sums over ranks after merging.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


import torch

from vpa_lightning._io import write_text_atomic
from vpa_lightning.augment.pixels import corrupt_pixel_values
from vpa_lightning.models.generation import encode_for_generation, greedy_generate

__all__ = ["Augmentation", "generate_pairs", "read_prompts"]

PathLike = str | os.PathLike[str]
#: A rejected-side corruption: a name, ``{name: ..., option: ...}``, or a list of those (composed).
Augmentation = str | dict[str, Any] | list[Any]


# --------------------------------------------------------------------------- prompts
def _is_json_list(path: Path) -> bool:
    if path.suffix.lower() == ".json":
        return True
    if path.suffix.lower() == ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("[")
    return False


def _strip_image_token(text: str) -> str:
    return text.replace("<image>", "").replace("<video>", "").strip()


def _video_field(row: dict[str, Any]) -> tuple[Any, str]:
    """``(value, field name)`` of a row's ``videos`` or ``video`` field (``(None, "video")`` for none)."""
    for name in ("videos", "video"):
        if row.get(name) not in (None, "", [], {}):
            return row[name], name
    return None, "video"


def _load_videos(image_root: Path, prompt: dict[str, Any], sampling: Any) -> list[Any]:
    """The prompt's videos as :class:`~vpa_lightning.models.video.VideoClip` (``[]`` for none), its ``video`` /
    ``videos`` field read as ``vpa-shard build`` reads it (one video or a list; a video is a path or a list of
    frame paths), so the pairs' shards hold the videos the answers saw."""
    from vpa_lightning.collect.prompts import _videos
    from vpa_lightning.data.video import load_video

    value, field = _video_field(prompt)
    return [load_video(v, sampling) for v in _videos(value, image_root, field)] if value is not None else []


def read_prompts(
    prompts_file: PathLike,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(prompts, rejects)``: prompts are ``{"image", "question", "source"}``, rejects are
    ``{"source", "reason"}``; ``source`` is ``"line N"`` (JSONL) or ``"id X"`` / ``"index N"`` (JSON). A video
    prompt also has its ``video`` or ``videos`` field as given (``image`` may then be absent)."""
    path = Path(prompts_file)
    prompts: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []

    def accept(source: str, image: Any, question: Any, no_question: str, videos: Any = None, field: str = "video") -> None:
        # The checks both formats share: a non-empty image path (or a video) and a question left after
        # removing the <image> / <video> placeholders.
        has_video = videos not in (None, "", [], {})
        if not has_video and (not isinstance(image, str) or not image):
            rejects.append({"source": source, "reason": "no image"})
        elif has_video and image is not None and (not isinstance(image, str) or not image):
            rejects.append({"source": source, "reason": "image is not a path"})
        elif not isinstance(question, str) or not _strip_image_token(question):
            rejects.append({"source": source, "reason": no_question})
        else:
            prompt = {"image": image, "question": _strip_image_token(question), "source": source}
            if has_video:
                prompt[field] = videos
            prompts.append(prompt)

    if _is_json_list(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of LLaVA-style conversations")
        for i, entry in enumerate(data):
            source = f"id {entry['id']}" if isinstance(entry, dict) and "id" in entry else f"index {i}"
            if not isinstance(entry, dict):
                rejects.append({"source": source, "reason": "entry is not an object"})
                continue
            turns = entry.get("conversations") or []
            question = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
            accept(source, entry.get("image"), question, "no human turn", *_video_field(entry))
    else:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                source = f"line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    rejects.append({"source": source, "reason": f"invalid JSON: {exc.msg}"})
                    continue
                if not isinstance(row, dict):
                    rejects.append({"source": source, "reason": "row is not an object"})
                    continue
                accept(source, row.get("image"), row.get("question"), "no question", *_video_field(row))
    return prompts, rejects


def _load_image(image_root: Path, rel: str):
    from PIL import Image

    path = Path(rel) if os.path.isabs(rel) else image_root / rel
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------- driver
def _wait_for(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [str(p) for p in paths if not p.exists()]
            raise TimeoutError(f"ranks did not finish generating: missing {missing}")
        time.sleep(1.0)


def generate_pairs(
    model: str | tuple[Any, Any],
    prompts_file: PathLike,
    image_root: PathLike,
    out_dir: PathLike,
    *,
    augmentation: Any = "diffusion_noise",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    val_fraction: float = 0.0,
    barrier_timeout: float = 3600.0,
    dtype: str | None = None,
    device: str | None = None,
    video_fps: float | None = 2.0,
    video_max_frames: int | None = 16,
    video_max_pixels: int | None = None,
) -> dict[str, Any]:
    """Generate SeVa pairs for this rank's share of ``prompts_file`` and shard them.

    Args:
        model: ``model_name_or_path`` for :func:`vpa_lightning.module.load_vlm` (a local folder or
            ``tiny:llava``), or a ``(model, processor)`` tuple.
        prompts_file: LLaVA-665k-style JSON list or ``{"image", "question"}`` JSONL.
        image_root: Directory that relative image paths are relative to.
        out_dir: Gets ``pairs-rank{r}.jsonl``, ``seva-rank{r}.json`` and the shards in ``rank{r}/``.
        augmentation: Anything :func:`vpa_lightning.augment.build_augmentation` accepts
            (``"none"`` makes every pair identical - useful only for testing).
        max_new_tokens: Greedy decoding length.
        batch_size: Prompts per ``generate`` call.
        seed: Seed of the augmentation (batch ``b`` uses ``seed + b``) and of the build shuffle.
        rank, world_size: This process's share (prompts ``i % world_size == rank``).
        val_fraction: Share of images the build holds out in ``val-*`` shards.
        barrier_timeout: Seconds to wait for the other ranks' pair files (``world_size > 1``).
        dtype: Passed to ``load_vlm`` when ``model`` is a name.
        device: Where to generate; ``None`` = ``cuda:LOCAL_RANK`` when CUDA is available, else
            the model's current device (CPU for a freshly loaded one).
        video_fps, video_max_frames, video_max_pixels: How video prompts' videos are sampled (frames per
            second, most frames, most pixels per frame; ``None``: no limit of that kind), as the trainer's
            ``--data.video_*``.

    Returns:
        The counts (also written to ``out_dir/seva-rank{rank}.json``).
    """
    from vpa_lightning.augment import build_augmentation
    from vpa_lightning.data import build as build_shards

    if not 0 <= rank < world_size:
        raise ValueError(
            f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
        )
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if video_fps is not None and not video_fps > 0:
        raise ValueError(f"--video_fps must be > 0 or null, got {video_fps}")
    if video_max_frames is not None and video_max_frames < 1:
        raise ValueError(f"--video_max_frames must be >= 1 or null, got {video_max_frames}")
    if video_fps is None and video_max_frames is None:
        raise ValueError("--video_fps and --video_max_frames are both null: set at least one")
    from vpa_lightning.data.video import VideoSampling

    sampling = VideoSampling(fps=video_fps, max_frames=video_max_frames, max_pixels=video_max_pixels)
    aug = build_augmentation(augmentation)
    if isinstance(model, (str, os.PathLike)):
        from vpa_lightning.module import load_vlm

        model, processor = load_vlm(os.fspath(model), seed=seed, dtype=dtype)
    else:
        model, processor = model
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device is not None:
        model.to(device)
    model.eval()
    model_device = next(model.parameters()).device

    image_root = Path(image_root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    all_prompts, parse_rejects = read_prompts(prompts_file)
    # Malformed rows are counted by rank 0 only; prompts are split round-robin.
    rejects = list(parse_rejects) if rank == 0 else []
    mine = [p for i, p in enumerate(all_prompts) if i % world_size == rank]
    prompts_in = len(mine) + len(rejects)

    if any("video" in p or "videos" in p for p in mine):  # refused at once, naming the families that take video
        from vpa_lightning.models.families import family_of

        family_of(processor).check_video(processor, f"{prompts_file} has video prompts",
                                             "Use one of them (--model), or prompts without videos")
        sampling = family_of(processor).video_sampling(sampling)  # the family's frame count
    def batches() -> Any:
        # Decoded a batch at a time (a rank's clips decoded up front would not fit in memory); the batches are
        # those of the readable prompts in order, as if the unreadable ones had been removed first.
        chunk: list[tuple[dict[str, Any], list[Any], list[Any]]] = []
        for p in mine:
            try:
                image = [_load_image(image_root, p["image"])] if p.get("image") else []
                chunk.append((p, image, _load_videos(image_root, p, sampling)))
            except Exception as exc:  # noqa: BLE001 - any unreadable image or video is a counted reject
                what = {k: p[k] for k in ("image", "video", "videos") if p.get(k) is not None}
                rejects.append({"source": p["source"], **what, "reason": f"{type(exc).__name__}: {exc}"})
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    rows: list[dict[str, Any]] = []
    for b, chunk in enumerate(batches()):
        inputs = encode_for_generation(
            processor, [im for _, im, _ in chunk], [p["question"] for p, _, _ in chunk],
            videos=[v for _, _, v in chunk], video_max_pixels=video_max_pixels,
        )
        # on the model's device, so the augmentation (Kornia, diffusion noise) runs on the GPU too
        inputs = {k: v.to(model_device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        chosen = greedy_generate(model, processor, inputs, max_new_tokens)
        # images and videos alike; each clip's frames with one set of random parameters
        corrupted = corrupt_pixel_values(inputs, processor, aug, seed=seed + b)
        rejected = greedy_generate(model, processor, corrupted, max_new_tokens)
        for (p, _, _), c, r in zip(chunk, chosen, rejected):
            media = {k: p[k] for k in ("image", "video", "videos") if p.get(k) is not None}
            rows.append({**media, "question": p["question"], "chosen": c, "rejected": r})

    pairs_file = out / f"pairs-rank{rank}.jsonl"
    write_text_atomic(
        pairs_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )

    all_files = [out / f"pairs-rank{r}.jsonl" for r in range(world_size)]
    if world_size > 1:
        _wait_for(all_files, barrier_timeout)
    shard_dir = out / f"rank{rank}"
    manifest = build_shards(
        [os.fspath(f) for f in all_files],
        shard_dir,
        image_root=image_root,
        format="pairwise",
        partition=(rank, world_size),
        val_fraction=val_fraction,
        seed=seed,
        allow_empty=True,  # every pair identical is a result (counted below), not a failure
    )
    c = manifest["counts"]
    counts: dict[str, Any] = {
        "rank": rank,
        "world_size": world_size,
        "prompts_in": prompts_in,
        "rejected": len(rejects),
        "generated": len(rows),
        # A row whose two answers are identical is rejected by the build with that reason;
        # it is counted once, as ``identical_dropped``.
        "rejected_by_build": max(
            c["records_rejected"] - c["pairs_dropped_identical"], 0
        ),
        "deduplicated": c["records_deduplicated"],
        "identical_dropped": c["pairs_dropped_identical"],
        "pairs_written": c["pairs"],
        "shard_dir": os.fspath(shard_dir),
        "pairs_file": os.fspath(pairs_file),
        "rejected_reasons": rejects,
    }
    write_text_atomic(out / f"seva-rank{rank}.json", json.dumps(counts, indent=2) + "\n")
    return counts
