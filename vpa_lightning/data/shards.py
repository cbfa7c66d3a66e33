"""Python API of the shard builder, for notebooks and other projects.

Every function here is a thin wrapper over :mod:`vpa_lightning.rust_pairs`; the work runs in
Rust with the GIL released. Errors are typed: :class:`ConfigError` for a bad option (the
message names the flag), :class:`InputFileError` for an unreadable input file,
:class:`OutputError`, :class:`ManifestError`; all derive from :class:`RustPairsError`.
Bad *records* never raise: they are listed in ``rejects.jsonl`` and counted in the manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from vpa_lightning import rust_pairs as _rp
from vpa_lightning.rust_pairs import ConfigError, InputFileError, ManifestError, OutputError, RustPairsError

PathLike = Union[str, "os.PathLike[str]"]
Format = Literal["auto", "vlfeedback", "rated", "pairwise", "trl", "mmdpo", "povid", "llava-rlhf", "ms-swift", "mapped"]

__all__ = [
    "ConfigError",
    "EmptyBuildError",
    "InputFileError",
    "ManifestError",
    "OutputError",
    "RustPairsError",
    "bradley_terry",
    "build",
    "build_options",
    "formats",
    "parse_fields",
    "recipes",
    "inspect",
    "load_manifest",
    "merge",
    "parse_partition",
    "strategies",
]


class EmptyBuildError(RustPairsError):
    """A build used no record: every input record was rejected (or there was none). The outputs
    (``rejects.jsonl``, the manifest with its per-file counts) are written; the message names
    each file with its counts. :attr:`manifest` holds the manifest."""

    def __init__(self, message: str, manifest: dict[str, Any]) -> None:
        super().__init__(message)
        self.manifest = manifest


def file_counts_lines(manifest: Mapping[str, Any]) -> list[str]:
    """One line per input file: container, layout, records in / used / deduplicated / rejected."""
    return [
        f"{f['file']}: {f['skipped']}" if f.get("skipped") else
        f"{f['file']} ({f['container']}, layout {f['layout'] or 'not detected'}): {f['records_in']} records in, "
        f"{f['records_used']} used, {f['records_deduplicated']} deduplicated, {f['records_rejected']} rejected"
        for f in manifest.get("files", [])
    ]


def _check_not_empty(manifest: dict[str, Any], out: PathLike) -> None:
    c = manifest["counts"]
    # A partition whose share happens to be empty or all rejected cannot judge the whole build
    # while other partitions got records; a build that read nothing, or used nothing, fails.
    partition_elsewhere = manifest["partition"][1] > 1 and c.get("records_other_partitions", 0) > 0
    if c["records_used"] > 0 or partition_elsewhere:
        return
    lines = file_counts_lines(manifest) or ["(no input file)"]
    why = "no input record" if c["records_in"] == 0 else f"all {c['records_in']} records were rejected"
    raise EmptyBuildError(
        f"the build used no record ({why}); expected records of a supported layout "
        f"(see `vpa-shard build --help`) with readable images. Per file:\n  " + "\n  ".join(lines)
        + f"\nReasons, with file and line: {Path(out) / manifest['rejects']}",
        manifest,
    )


def parse_partition(spec: str | tuple[int, int]) -> tuple[int, int]:
    """``"i/N"`` (or a tuple) to ``(i, N)``; raises :class:`ConfigError` naming ``--partition``."""
    if isinstance(spec, tuple):
        return int(spec[0]), int(spec[1])
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ConfigError(f"--partition must look like i/N (for example 0/4), got {spec!r}") from None
    return i, n


def parse_rating_range(spec: str | Sequence[float] | None) -> list[float] | None:
    """``"LO:HI"`` (or a pair) to ``[lo, hi]``; raises :class:`ConfigError` naming ``--rating-range``."""
    if spec is None:
        return None
    try:
        lo, hi = (float(x) for x in (str(spec).split(":") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise ConfigError(f"--rating-range must look like LO:HI (for example 1:10), got {spec!r}") from None
    return [lo, hi]


def parse_fields(fields: Mapping[str, str] | Sequence[str] | None) -> list[list[str]]:
    """``{"prompt": "question"}`` or ``["prompt=question", ...]`` to ``[[name, dotted path], ...]``.

    Raises :class:`ConfigError` naming ``--field`` for a declaration without ``=``.
    """
    if not fields:
        return []
    if isinstance(fields, Mapping):
        return [[str(k), str(v)] for k, v in fields.items()]
    out = []
    for spec in fields:
        name, sep, path = str(spec).partition("=")
        if not sep:
            raise ConfigError(f"--field: expected NAME=PATH (for example prompt=question), got {spec!r}")
        out.append([name.strip(), path.strip()])
    return out


def _aspects(aspects: str | Mapping[str, float] | Sequence[tuple[str, float]] | None) -> list[list[Any]] | None:
    if aspects is None:
        return None
    if isinstance(aspects, str):
        return [list(a) for a in _rp.parse_aspect_weights(aspects)]
    items = aspects.items() if isinstance(aspects, Mapping) else aspects
    return [[str(name), float(w)] for name, w in items]


def build_options(
    inputs: Sequence[PathLike],
    out: PathLike,
    *,
    image_root: PathLike | None = None,
    format: Format = "auto",
    strategy: str = "all-pairs",
    min_margin: float | None = None,
    min_probability: float = 0.75,
    aspects: str | Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    rating_range: str | Sequence[float] | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    partition: str | tuple[int, int] = (0, 1),
    near_dup: float | None = None,
    bt_prior: float = 0.1,
    max_text_chars: int = 100_000,
    max_responses: int = 256,
    max_record_bytes: int = 64 << 20,
    image_check: Literal["structure", "decode", "header"] = "structure",
    max_image_pixels: int = 89_478_485,
    max_video_bytes: int = 2 << 30,
    spill_bucket_bytes: int = 64 << 20,
    threads: int | None = None,
    io_threads: int = 16,
    fsync: bool = False,
    progress: bool = False,
    fields: Mapping[str, str] | Sequence[str] | None = None,
    image_template: str | None = None,
    dedup: Literal["exact", "normalized", "eos"] | None = None,
    score: Literal["mean", "sum"] | None = None,
    recipe: str | None = None,
    exclude_chosen_models: Sequence[str] = (),
    ref_logp_model: str | None = None,
) -> dict[str, Any]:
    """The options :func:`build` sends to Rust, as a dict (see :func:`build` for their meaning)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    return {
        "inputs": [os.fspath(p) for p in inputs],
        "out": os.fspath(out),
        "image_root": None if image_root is None else os.fspath(image_root),
        "format": format,
        "strategy": strategy,
        "min_margin": min_margin,
        "min_probability": min_probability,
        "aspects": _aspects(aspects),
        "rating_range": parse_rating_range(rating_range),
        "val_fraction": val_fraction,
        "seed": seed,
        "max_samples_per_shard": max_samples_per_shard,
        "max_shard_bytes": max_shard_bytes,
        "partition": list(parse_partition(partition)),
        "near_dup_threshold": near_dup,
        "bt_prior": bt_prior,
        "max_text_chars": max_text_chars,
        "max_responses": max_responses,
        "max_record_bytes": max_record_bytes,
        "image_check": image_check,
        "max_image_pixels": max_image_pixels,
        "max_video_bytes": max_video_bytes,
        "spill_bucket_bytes": spill_bucket_bytes,
        "threads": threads,
        "io_threads": io_threads,
        "fsync": fsync,
        "progress": progress,
        "fields": parse_fields(fields),
        "image_template": image_template,
        "dedup": dedup,
        "score": score,
        "recipe": recipe,
        "exclude_chosen_models": list(exclude_chosen_models),
        "ref_logp_model": ref_logp_model,
    }


def build(inputs: Sequence[PathLike] | PathLike, out: PathLike, *, allow_empty: bool = False, **options: Any) -> dict[str, Any]:
    """Validate, deduplicate, rank and shard preference annotations.

    Args:
        inputs: Files or directories. Containers are recognised by content: JSON lines, a JSON
            array (streamed), Parquet (a file, or a Hugging Face dataset folder), an
            InternVL/MMPR ``meta.json``; a directory gives every ``*.jsonl``/``*.json``/``*.parquet``
            under it. The layout (VLFeedback rows, HelpSteer-style rated rows, pairwise rows, ...)
            is detected per file unless ``format`` is set. A file that is none of these raises
            :class:`InputFileError` naming it.
        out: Output directory for ``train-*.tar``, ``val-*.tar``, ``manifest.json``,
            ``rejects.jsonl`` and ``report.json``.
        image_root: Directory that relative image paths are relative to (default: each input
            file's directory).
        format: ``auto`` or a layout: ``vlfeedback``, ``rated``, ``pairwise`` (RLAIF-V, RLHF-V,
            SPA-VL, SeVa; LLaMA-Factory sharegpt preference rows; LLaVA-Hound and MM-RLHF video rows),
            ``trl``, ``mmdpo``, ``povid``, ``llava-rlhf``, ``ms-swift``, ``mapped`` (``fields``).
        strategy: Pair selection: ``all-pairs`` (Silkie), ``best-vs-rest`` (MM-DPO),
            ``best-vs-worst``, ``best-vs-random`` (UltraFeedback), ``min-probability``.
        min_margin: Minimum weighted-mean-score gap of a pair (default: the strategy's own, 2 for
            ``best-vs-rest``, else 0 = any positive gap).
        min_probability: Bradley-Terry probability threshold of ``min-probability``.
        aspects: Declared aspects and weights, ``"Helpfulness=1,Visual Faithfulness=1"`` or a dict
            (default: the three VLFeedback aspects, or the five HelpSteer aspects for rated rows).
        rating_range: The rating scale, ``"LO:HI"``; a rating outside it rejects its response with
            the reason. Default: the format's known scale (VLFeedback 1-5; HelpSteer 0-4 for rated
            rows with the default aspects), else any rating within ±1e15.
        val_fraction: Share of images held out in ``val-*`` shards (split by image hash).
        seed: Shuffle seed; the same input and seed give byte-identical shards.
        max_samples_per_shard: Samples (groups) per shard at most.
        max_shard_bytes: Bytes per shard at most (a single larger sample still gets a shard).
        partition: ``"i/N"``: build only the part of the output owned by partition ``i``.
        near_dup: Merge prompts on the same image whose word-3-gram Jaccard similarity is at
            least this (MinHash/LSH); ``None`` disables it.
        bt_prior: L2 prior on Bradley-Terry log-strengths (must be > 0).
        max_text_chars: Longer prompts or responses are rejected.
        max_responses: Responses per record, and per group after duplicates are pooled (default
            256); a record or group with more is rejected with the reason (ranking and all-pairs
            are quadratic in it).
        image_check: ``structure`` (default: JPEG markers to end-of-image, PNG chunk CRCs, ...;
            catches truncated and corrupt files), ``decode`` (full pixel decode; slower) or
            ``header`` (dimensions only).
        max_image_pixels: Images with more pixels (width x height, read from the header before
            any decode) are rejected in every check mode (default 89,478,485, Pillow's
            ``MAX_IMAGE_PIXELS``): a guard against decompression bombs.
        max_video_bytes: A video file larger than this is rejected from its size before it is read
            (a frame folder or frame list: its frames together; default 2 GiB, at most 8 GiB - 1).
        threads: Worker threads (default: all cores).
        io_threads: Threads that validate records, each reading image files (default 16: many
            small reads in flight).
        spill_bucket_bytes: Memory budget of one spill bucket: at most this many bytes of spilled
            records and one record per 2 KiB of it; bounds memory whatever the input (default 64 MiB).
        fsync: fsync each shard before renaming it into place (survives power loss; slower).
            Without it a killed build is still safe: shards only appear once complete.
        progress: Draw progress bars on stderr.
        fields: ``--field`` declarations, ``{"prompt": "question", "chosen": "answers.good"}``
            or ``["prompt=question", ...]``: where a row keeps prompt, image, video, chosen, rejected
            (dotted paths); implies ``format="mapped"``.
        image_template: The image path built from the row's fields, ``"merged_images/{id}.jpg"``.
        dedup: ``exact`` (default: merge only exact duplicates), ``normalized`` (also case and
            Unicode form) or ``eos`` (exact, end-of-sequence markers ignored; SeVa).
        score: ``mean`` (default) or ``sum`` of the weighted aspect ratings (MM-DPO sums).
        recipe: A seed recipe by name (see :func:`recipes`): ``silkie``, ``mmdpo``,
            ``mmdpo-self``, ``seva``; it sets strategy, aspects, score, margin and dedup.
        exclude_chosen_models: Responses of these models may be rejected but never chosen.
        ref_logp_model: The model that shipped reference log-probs came from (recorded per pair).
        allow_empty: Return normally when the build used no record (by default that raises
            :class:`EmptyBuildError`, after writing the outputs).

    Returns:
        The manifest (also written to ``out/manifest.json``, or ``manifest-pIofN.json`` for a
        partition).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    opts = build_options(inputs, out, **options)
    manifest = json.loads(_rp.build(json.dumps(opts)))
    if not allow_empty:
        _check_not_empty(manifest, out)
    return manifest


def inspect(directory: PathLike, *, verify_hashes: bool = True) -> dict[str, Any]:
    """Verify every shard of a build against its manifest (sha256, samples, pairs)."""
    return json.loads(_rp.inspect(os.fspath(directory), verify_hashes))


def merge(directories: Sequence[PathLike], out: PathLike | None = None) -> dict[str, Any]:
    """Join partition builds into one ``manifest.json`` (+ rejects and report) in ``out``."""
    dirs = [os.fspath(d) for d in directories]
    if not dirs:
        raise ConfigError("merge: give at least one directory")
    return json.loads(_rp.merge(dirs, os.fspath(out if out is not None else dirs[0])))


def load_manifest(directory: PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` of a build directory."""
    path = Path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist (is {directory} a finished build?)") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is malformed: {e}") from None


def bradley_terry(n_items: int, comparisons: Sequence[tuple[int, int, float]], alpha: float = 0.1) -> list[float]:
    """Penalised Bradley-Terry log-strengths: maximise Σ w·log σ(θ_win − θ_lose) − (alpha/2)·Σθ².

    Same optimum as ``choix.opt_pairwise(n_items, data, alpha=alpha / 2)`` for unit-weight data.
    """
    return _rp.bradley_terry(n_items, [(int(w), int(l), float(x)) for w, l, x in comparisons], alpha)


def strategies() -> list[tuple[str, str, float]]:
    """(name, description, default min-margin) of each pair selection strategy."""
    return _rp.strategies()


def formats() -> list[str]:
    """Names of the input layouts ``format`` accepts (``auto`` first)."""
    return _rp.formats()


def recipes() -> list[tuple[str, str]]:
    """(name, description) of each named seed recipe."""
    return _rp.recipes()
