"""``vpa sample``: K answers per prompt from a pool of models, written in VLFeedback's layout.

Each model of the pool answers every prompt K times with its own sampling settings (temperature, top-p, most new
tokens, seed). Backends:

* ``hf``: a local transformers folder or a ``tiny:`` model, ``generate`` with the K samples of a prompt as one batch
  whose image is encoded once (the vision tower runs once per prompt, its features shared by the K rows:
  :func:`~vpa_lightning.models.logps.encode_images_once`); a video prompt's videos likewise, decoded once per prompt
  (``--video-fps``, ``--video-max-frames``, ``--video-max-pixels``; families that take video only). Sampling draws from a generator seeded by (seed, model,
  prompt id), so a prompt's answers do not depend on which prompts ran before it: a resumed run writes what an
  uninterrupted one would.
* ``openai``: any OpenAI-compatible chat server serving a VLM (vLLM, SGLang, ``vpa serve``): images go as data URLs,
  video files as ``video_url`` data URLs (vLLM's format), frame folders and frame lists as their frames' image URLs,
  ``n=K`` in one request, through :class:`~vpa_lightning.eval.judge.JudgeClient` (retries, deadlines, reply caps, no
  key across origins) and its SQLite cache, so a rerun pays nothing twice.

Output (``--out FILE``): one JSON-lines file in VLFeedback's layout, one row per prompt, ``vpa-shard build`` reads
it as it is once rated (``vpa judge``)::

    {"id", "prompt": "<image>\\nQuestion", "img_path": "images/x.png" (a list for several, [] for none),
     "models": [...], "completions": [{"model": name, "response": text}, ...], ...the prompt's other fields}

While it runs, each model's answers go to ``FILE.parts/<model>-<settings digest>.jsonl``, a line per prompt as soon
as it is sampled (flushed); a killed run started again with the same settings skips the prompts already there (a
torn last line is cut), so no prompt is lost or sampled twice (other settings sample afresh). The output is written (atomically) once every model has answered every prompt.
Embedded images (Parquet, shards) are written once to ``FILE.images/``. A prompt's videos are kept as ``"videos": [...]``
(each a video file's or frame folder's path relative to the output's folder, or a list of frame paths; embedded
videos written once to ``FILE.videos/``), with ``<video>`` placeholders in ``prompt`` where they sit, which
``vpa judge`` passes along and ``vpa-shard build`` reads. Prompts that cannot be used are in
``FILE.rejects.jsonl`` with file, line and reason; ``FILE.summary.json`` has the counts (``prompts_in = sampled +
rejected``) and the throughput per model (prompts/s, generated tokens/s).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vpa_lightning._io import write_text_atomic
from vpa_lightning.collect.prompts import Prompt, image_digest, read_prompts

__all__ = ["PoolModel", "SampleSettings", "hf_sample", "pool_models", "run_sample"]


@dataclass
class SampleSettings:
    """How one model samples: ``k`` answers per prompt at ``temperature`` (0: greedy, then the k are identical)
    with nucleus ``top_p``, at most ``max_new_tokens`` tokens each; ``seed`` with the prompt id seeds each prompt."""

    k: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: int = 0

    def check(self, where: str) -> None:
        if self.k < 1:
            raise ValueError(f"{where}: k must be >= 1, got {self.k}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"{where}: temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"{where}: max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class PoolModel:
    """One model of the pool: a ``name`` (in the output), a ``backend`` (``hf`` or ``openai``) and what it runs:
    ``model`` (a local folder or ``tiny:`` spec for ``hf``; the served model's name for ``openai``), ``base_url``
    and ``api_key`` (``openai``; default from ``$VPA_SAMPLE_BASE_URL`` / ``$OPENAI_BASE_URL`` and
    ``$VPA_SAMPLE_API_KEY`` / ``$OPENAI_API_KEY``), ``dtype`` and ``device`` (``hf``), and its sampling settings."""

    name: str
    model: str
    backend: str = "hf"
    base_url: str | None = None
    api_key: str | None = None
    dtype: str | None = None
    device: str | None = None
    settings: SampleSettings = field(default_factory=SampleSettings)

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"model name must be a non-empty file name, got {self.name!r}")
        if self.backend not in ("hf", "openai"):
            raise ValueError(f"model {self.name!r}: backend must be hf or openai, got {self.backend!r}")
        self.settings.check(f"model {self.name!r}")


def pool_models(entries: Any, defaults: dict[str, Any], where: str, **fallback: Any) -> list[PoolModel]:
    """The :class:`PoolModel` of each entry of a pool list (``name``, ``model``, optional ``backend``, ``base_url``,
    ``dtype``, ``device`` and sampling settings ``k``, ``temperature``, ``top_p``, ``max_new_tokens``, ``seed``);
    ``defaults`` are the sampling settings, ``fallback`` the other fields, of an entry that does not set them.
    Errors name ``where`` (the flag or file)."""
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected a list of models")
    out = []
    for e in entries:
        if not isinstance(e, dict) or "name" not in e or "model" not in e:
            raise ValueError(f"{where}: every entry needs name and model, got {e!r}")
        unknown = set(e) - {"name", "model", "backend", "base_url", "dtype", "device", *SampleSettings.__dataclass_fields__}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} in the entry of {e['name']!r}")
        settings = SampleSettings(**{**defaults, **{k: e[k] for k in SampleSettings.__dataclass_fields__ if k in e}})
        model = PoolModel(name=str(e["name"]), model=str(e["model"]), settings=settings,
                          **{k: e.get(k, fallback.get(k)) for k in ("backend", "base_url", "dtype", "device")
                             if e.get(k, fallback.get(k)) is not None})
        model.check()
        out.append(model)
    return out


def settings_digest(settings: Any) -> str:
    """A short digest of what determines a resumable part's lines: a part is reused only by the same settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prompt_seed(seed: int, model: str, prompt_id: str) -> int:
    """The sampling seed of one (model, prompt): independent of the order prompts run in."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{model}\0{prompt_id}".encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- hf
def _single_batch(processor: Any, prompt: Prompt, images: list[Any], videos: list[Any] | None = None,
                  video_max_pixels: int | None = None) -> Any:
    """The prompt as a one-row :class:`~vpa_lightning.models.logps.GroupBatch` (no response), for expanding to K
    rows with the image (and video) inputs laid out as the family lays them out."""
    import torch

    from vpa_lightning.models.families import family_of
    from vpa_lightning.models.generation import encode_for_generation
    from vpa_lightning.models.logps import IGNORE_INDEX, GroupBatch

    family = family_of(processor)
    videos = list(videos or [])
    enc = encode_for_generation(processor, [images], [prompt.question], [prompt.offsets], videos=[videos],
                                video_offsets=[prompt.video_offsets], video_max_pixels=video_max_pixels)
    enc = {k: v for k, v in enc.items() if k not in family.dropped_inputs}
    ids = enc["input_ids"]
    counts = torch.tensor([len(images)])
    video_counts = torch.tensor([len(videos)]) if videos else None
    return GroupBatch(
        model_inputs=enc, labels=torch.full_like(ids, IGNORE_INDEX), group_index=torch.zeros(1, dtype=torch.long),
        group_sizes=[1], prompt_lengths=torch.tensor([ids.shape[1]]), truncated=torch.zeros(1, dtype=torch.bool),
        image_counts=counts, pixel_rows=family.pixel_rows(processor, enc, ids, counts),
        image_inputs=tuple(k for k in family.image_inputs if k in enc),
        video_counts=video_counts,
        video_pixel_rows=family.video_pixel_rows(processor, enc, video_counts) if videos else None,
        video_inputs=tuple(k for k in family.video_inputs if k in enc) if videos else (),
    )


def hf_sample(model: Any, processor: Any, prompt: Prompt, settings: SampleSettings, seed: int,
              images: list[Any] | None = None, videos: list[Any] | None = None,
              video_sampling: Any = None) -> list[tuple[str, int]]:
    """``settings.k`` sampled answers to ``prompt`` as ``(text, generated tokens)``: one ``generate`` over the K rows,
    the images and videos encoded once for all of them (the vision tower's ``get_image_features`` /
    ``get_video_features`` run on one row), the draws seeded by ``seed`` alone. ``images`` / ``videos``: the prompt's
    images and :class:`~vpa_lightning.models.video.VideoClip` s already loaded (``None``: loaded here, videos as
    ``video_sampling`` says; a bad one raises ``ValueError``). A video prompt needs a family that takes video
    (else :class:`~vpa_lightning.errors.VideoUnsupportedError`)."""
    from contextlib import nullcontext

    import torch

    from vpa_lightning.models.logps import encode_images_once, select_rows

    images = prompt.load_images() if images is None else images
    videos = prompt.load_videos(video_sampling) if videos is None else videos
    if settings.temperature == 0 and settings.k > 1:  # greedy: the K answers are one answer K times
        from dataclasses import replace

        return hf_sample(model, processor, prompt, replace(settings, k=1), seed, images, videos, video_sampling) * settings.k
    max_pixels = getattr(video_sampling, "max_pixels", None)
    one = _single_batch(processor, prompt, images, videos, max_pixels)
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    if callable(supports) and supports():
        # transformers (>= 5.25) encodes the images before it expands the prompt to the K returned sequences
        batch, context, expand = one, nullcontext(), {"num_return_sequences": settings.k}
    else:  # K rows of the prompt, one group: its image encoded once for the K (encode_images_once)
        batch = select_rows(one, torch.zeros(settings.k, dtype=torch.long))
        context, expand = None, {}
    param = next(model.parameters())
    batch = batch.to(param.device)
    if context is None:
        context = encode_images_once(model, batch)
    inputs = {k: (v.to(param.dtype) if k.startswith("pixel_values") and v.is_floating_point() else v)
              for k, v in batch.model_inputs.items()}
    tok = getattr(processor, "tokenizer", processor)
    sampling = ({"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
                if settings.temperature > 0 else {"do_sample": False})
    devices = [param.device] if param.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices), context:
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, pad_token_id=tok.pad_token_id,
                             top_k=None, **sampling, **expand)
    new = out[:, inputs["input_ids"].shape[1]:]
    stop = {tok.pad_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None)), tok.eos_token_id}
    lengths = [int(next((i + 1 for i, t in enumerate(row.tolist()) if t in stop), len(row))) for row in new]
    texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return list(zip(texts, lengths))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------- openai
def _data_url(image: str | bytes) -> str:
    data = Path(image).read_bytes() if isinstance(image, str) else image
    kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg" if data[:3] == b"\xff\xd8\xff" else "webp" if data[8:12] == b"WEBP" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _video_type(data: bytes) -> str:
    """The MIME type of a video file from its first bytes (the container, as the data core checks it)."""
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "video/x-msvideo"
    if data[4:12] == b"ftypqt  ":
        return "video/quicktime"
    return "video/mp4"


def _video_parts(video: Any) -> list[dict[str, Any]]:
    """One video as OpenAI chat parts: a video file as one ``video_url`` data URL (vLLM's format; the server samples
    its frames), a frame folder or frame list as its frames' ``image_url`` parts, in order."""
    if isinstance(video, list):
        return [{"type": "image_url", "image_url": {"url": _data_url(f)}} for f in video]
    if isinstance(video, str) and Path(video).is_dir():
        from vpa_lightning.data.video import folder_frames

        return [{"type": "image_url", "image_url": {"url": _data_url(str(f))}} for f in folder_frames(video)]
    data = Path(video).read_bytes() if isinstance(video, str) else video
    return [{"type": "video_url", "video_url": {"url": f"data:{_video_type(data)};base64,{base64.b64encode(data).decode('ascii')}"}}]


def chat_messages(prompt: Prompt, images: list[str | bytes] | None = None) -> list[dict[str, Any]]:
    """The prompt as an OpenAI chat: one user turn of text, ``image_url`` parts and video parts (a video file as
    ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}``, vLLM's format; a frame folder or
    frame list as its frames' ``image_url`` parts), each where it sits (at one offset images first)."""
    images = prompt.images if images is None else images
    offsets = prompt.offsets if prompt.offsets is not None else [0] * len(images)
    video_offsets = prompt.video_offsets if prompt.video_offsets is not None else [0] * len(prompt.videos)
    media = sorted([(at, 0, i) for i, at in enumerate(offsets[: len(images)])]
                   + [(at, 1, i) for i, at in enumerate(video_offsets)])
    parts: list[dict[str, Any]] = []
    last = 0
    for at, kind, i in media:
        if prompt.question[last:at]:
            parts.append({"type": "text", "text": prompt.question[last:at]})
        if kind == 0:
            parts.append({"type": "image_url", "image_url": {"url": _data_url(images[i])}})
        else:
            parts.extend(_video_parts(prompt.videos[i]))
        last = at
    parts.append({"type": "text", "text": prompt.question[last:]})
    return [{"role": "user", "content": parts}]


class _OpenAISampler:
    def __init__(self, spec: PoolModel, cache_dir: str | None) -> None:
        from vpa_lightning.eval.judge import JudgeClient

        base_url = spec.base_url or os.environ.get("VPA_SAMPLE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        api_key = spec.api_key or os.environ.get("VPA_SAMPLE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = JudgeClient(base_url=base_url, model=spec.model, api_key=api_key, cache_dir=cache_dir,
                                  max_tokens=spec.settings.max_new_tokens)
        self.settings = spec.settings

    def sample(self, prompt: Prompt, seed: int) -> list[tuple[str, int]]:
        s = self.settings
        texts = self.client.complete(chat_messages(prompt), n=s.k, temperature=s.temperature, top_p=s.top_p,
                                     seed=seed, max_tokens=s.max_new_tokens)
        return [(t.strip(), len(t.split())) for t in texts]  # tokens: the server's are not kept; words instead

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------------------- parts and output
def _read_part(path: Path) -> dict[str, dict[str, Any]]:
    """The prompts a model already answered (a torn last line, from a killed run, is cut off the file)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    for line in data[:keep].splitlines():
        if line.strip():
            row = json.loads(line)
            done[row["id"]] = row
    return done


def _image_files(prompt: Prompt, out: Path) -> list[str]:
    """Paths of the prompt's images as the output names them: given paths relative to the output's folder,
    embedded images written once under ``OUT.images/``."""
    folder = out.parent
    names = []
    for image in prompt.images:
        if isinstance(image, bytes):
            ext = "jpg" if image[:3] == b"\xff\xd8\xff" else "webp" if image[8:12] == b"WEBP" else "png"
            path = out.with_name(out.name + ".images") / f"{image_digest(image)}.{ext}"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(image)
                tmp.replace(path)
        else:
            path = Path(image)
        try:
            names.append(os.path.relpath(path, folder))
        except ValueError:  # another drive
            names.append(str(path))
    return names


def _video_files(prompt: Prompt, out: Path) -> list[str | list[str]]:
    """The prompt's videos as the output names them (``vpa-shard build`` reads them back): given paths (video files,
    frame folders, frame lists) relative to the output's folder; embedded videos written once under ``OUT.videos/``
    (a file as ``<digest>.<ext>``, frames from a shard as a frame folder ``<digest>/f0000.jpg``, ...)."""
    folder = out.parent
    store = out.with_name(out.name + ".videos")

    def rel(path: Path) -> str:
        try:
            return os.path.relpath(path, folder)
        except ValueError:  # another drive
            return str(path)

    def write_once(path: Path, data: bytes) -> None:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    names: list[str | list[str]] = []
    for video in prompt.videos:
        if isinstance(video, bytes):
            ext = {"video/webm": "webm", "video/x-msvideo": "avi", "video/quicktime": "mov"}.get(_video_type(video), "mp4")
            path = store / f"{image_digest(video)}.{ext}"
            write_once(path, video)
            names.append(rel(path))
        elif isinstance(video, list) and video and isinstance(video[0], bytes):
            digest = image_digest(b"".join(hashlib.sha256(f).digest() for f in video))
            for j, frame in enumerate(video):
                ext = "jpg" if frame[:3] == b"\xff\xd8\xff" else "webp" if frame[8:12] == b"WEBP" else "png"
                write_once(store / digest / f"f{j:04d}.{ext}", frame)
            names.append(rel(store / digest))
        elif isinstance(video, list):
            names.append([rel(Path(f)) for f in video])
        else:
            names.append(rel(Path(video)))
    return names


def _progress(total: int, desc: str) -> Any:
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="prompt")
    return None


def run_sample(
    sources: list[str],
    pool: list[PoolModel],
    out: str | os.PathLike[str],
    *,
    image_root: str | None = None,
    cache_dir: str | None = None,
    max_pixels: int | None = 89_478_485,
    limit: int | None = None,
    select: tuple[int, int, int] | None = None,
    video_sampling: Any = None,
) -> dict[str, Any]:
    """Sample every prompt of ``sources`` with every model of ``pool``; returns the summary (see the module doc).
    ``video_sampling``: how video prompts' videos are decoded (a :class:`~vpa_lightning.data.video.VideoSampling`;
    ``None``: the trainer's defaults, 2 fps, at most 16 frames).
    ``limit``: the first N prompts only. ``select = (seed, start, n)``: the prompts shuffled by ``seed`` (the same
    order for every ``start``), then ``n`` of them from ``start`` on, wrapping round (fresh slices of a prompt set,
    e.g. one per round)."""
    if not pool:
        raise ValueError("--model: the pool is empty")
    names = [m.name for m in pool]
    if len(set(names)) != len(names):
        raise ValueError(f"--model: model names must be unique, got {names}")
    for m in pool:
        m.check()
    out = Path(out)
    prompts, rejects = read_prompts(sources, image_root)
    records = len(prompts) + len(rejects)
    if limit is not None:
        prompts = prompts[:limit]
    if select is not None and prompts:
        import random

        order = list(range(len(prompts)))
        random.Random(select[0]).shuffle(order)
        start, n = select[1], min(select[2], len(prompts))
        prompts = [prompts[order[(start + i) % len(order)]] for i in range(n)]
    if not prompts:
        raise ValueError(f"no usable prompt in {', '.join(map(str, sources))} ({len(rejects)} rejected"
                         + (f"; first: {rejects[0].source}: {rejects[0].reason}" if rejects else "") + ")")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    per_model: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}  # prompt id -> reason (its image could not be loaded, ...)
    has_videos = any(p.videos for p in prompts)
    if has_videos and video_sampling is None:
        from vpa_lightning.data.video import VideoSampling

        video_sampling = VideoSampling(max_image_pixels=max_pixels)
    # the video sampling shapes the answers too; image-only runs keep their earlier digest (and resume)
    sampled_as = [asdict(video_sampling)] if has_videos else []
    part_of = {spec.name: parts / f"{spec.name}-{settings_digest([spec.model, spec.backend, spec.base_url, spec.dtype, asdict(spec.settings), *sampled_as])}.jsonl"
               for spec in pool}  # other settings (a new temperature, say) sample afresh
    for spec in pool:
        part = part_of[spec.name]
        done = _read_part(part)
        todo = [p for p in prompts if p.id not in done and p.id not in failed]
        stats = {"resumed": len(done), "sampled": 0, "tokens": 0, "seconds": 0.0}
        if todo:
            sampler, processor = _open(spec, cache_dir)
            spec_sampling = video_sampling
            if spec.backend == "hf" and any(p.videos for p in todo):  # refused at once, not after the image prompts
                from vpa_lightning.models.families import family_of

                family_of(processor).check_video(processor, f"--model {spec.name}: the prompts have videos",
                                                 "Sample with one of them (--model), or prompts without videos")
                spec_sampling = family_of(processor).video_sampling(video_sampling)  # the family's frame count
            bar = _progress(len(todo), spec.name)
            t0 = time.perf_counter()
            try:
                with open(part, "a", encoding="utf-8") as f:
                    for prompt in todo:
                        seed = prompt_seed(spec.settings.seed, spec.name, prompt.id)
                        try:  # the prompt's own problem (a missing or undecodable image or video): rejected, the run goes on
                            images = prompt.load_images(max_pixels)
                            videos = prompt.load_videos(spec_sampling)  # decoded for openai too: a bad video is a reject here
                        except ValueError as exc:
                            failed[prompt.id] = str(exc)
                            continue
                        if spec.backend == "hf":
                            answers = hf_sample(sampler, processor, prompt, spec.settings, seed, images, videos,
                                                spec_sampling)
                        else:
                            answers = sampler.sample(prompt, seed)
                        f.write(json.dumps({"id": prompt.id, "completions": [a for a, _ in answers],
                                            "tokens": sum(n for _, n in answers)}, ensure_ascii=False) + "\n")
                        f.flush()
                        stats["sampled"] += 1
                        stats["tokens"] += sum(n for _, n in answers)
                        if bar is not None:
                            bar.update(1)
            finally:
                stats["seconds"] = time.perf_counter() - t0
                if bar is not None:
                    bar.close()
                if spec.backend == "openai":
                    stats["requests"] = sampler.client.counters  # requests_sent, cache_hits, retries
                    sampler.close()
                del sampler
        stats["prompts_per_s"] = stats["sampled"] / stats["seconds"] if stats["seconds"] else None
        stats["tokens_per_s"] = stats["tokens"] / stats["seconds"] if stats["seconds"] else None
        per_model[spec.name] = {**stats, "settings": asdict(spec.settings), "backend": spec.backend, "model": spec.model}
    # the output: every prompt every model answered, in input order, each model's K answers in pool order
    answered = {spec.name: _read_part(part_of[spec.name]) for spec in pool}
    lines = []
    for prompt in prompts:
        if prompt.id in failed or not all(prompt.id in answered[n] for n in names):
            continue
        completions = [{"model": n, "response": text} for n in names for text in answered[n][prompt.id]["completions"]]
        row = {"id": prompt.id, "prompt": prompt.prompt_text(), **prompt.extra, "models": names, "completions": completions}
        files = _image_files(prompt, out)
        # no image: [] (not absent: the VLFeedback layout reads a row without img_path as merged_images/{id}.jpg)
        row["img_path"] = files[0] if len(files) == 1 else files
        if prompt.videos:
            row["videos"] = _video_files(prompt, out)
        lines.append(json.dumps(row, ensure_ascii=False))
    all_rejects = [asdict(r) for r in rejects] + [{"source": next(p.source for p in prompts if p.id == i), "reason": why}
                                                   for i, why in failed.items()]
    write_text_atomic(out.with_name(out.name + ".rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in all_rejects))
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    summary = {
        "out": str(out), "records": records, "prompts_in": len(prompts) + len(rejects),
        "sampled": len(lines), "rejected": len(all_rejects), "completions": sum(len(json.loads(x)["completions"]) for x in lines),
        "models": per_model,
    }
    write_text_atomic(out.with_name(out.name + ".summary.json"), json.dumps(summary, indent=2) + "\n")
    if not lines:
        raise RuntimeError(f"no prompt was sampled ({len(all_rejects)} rejected; see {out.name}.rejects.jsonl)")
    return summary


def _open(spec: PoolModel, cache_dir: str | None) -> tuple[Any, Any]:
    """``(model, processor)`` of an ``hf`` model (eval mode, on its device), or ``(sampler, None)``."""
    if spec.backend == "openai":
        return _OpenAISampler(spec, cache_dir), None
    import torch

    from vpa_lightning.models.loading import load_vlm

    model, processor = load_vlm(spec.model, dtype=spec.dtype)
    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor
