"""Where the shards are: resolving ``--data.*_shards`` (a build directory's manifest, a path, brace notation, a
URL), and checking before the first read that the local ones exist, are regular files and match their manifest."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds

from vpa_lightning.data.shards import ManifestError, load_manifest
from vpa_lightning.errors import BadShardsError, MissingShardsError

__all__ = ["check_shards", "count_samples", "missing_shards", "resolve_shards"]

log = logging.getLogger(__name__)


def resolve_shards(
    train_shards: str, val_shards: str | None = None, expected: dict[str, dict] | None = None
) -> tuple[str | list[str], str | list[str] | None, dict[str, int]]:
    """Resolve the ``train_shards`` / ``val_shards`` arguments of :class:`PreferenceDataModule`.

    A local directory with ``manifest.json`` gives its ``train`` shards (and its
    ``val`` shards unless ``val_shards`` is set) as absolute file paths: a manifest names files
    relative to it, never a URL or a ``pipe:`` command (:class:`ManifestError` otherwise).
    Anything else is typed by the user and passed to WebDataset as is (a path, brace notation
    ``shard-{000000..000009}.tar``, ``::``-separated lists, ``pipe:`` / ``http(s)://`` URLs).

    Args:
        expected: Filled with ``{path: manifest shard entry}`` for every shard a manifest named
            (what :func:`check_shards` verifies sizes and hashes against).

    Returns:
        ``(train_urls, val_urls, counts)`` where ``counts`` has ``train_samples``,
        ``train_pairs``, ``val_samples``, ``val_pairs`` when a manifest was read.
    """
    counts: dict[str, int] = {}

    def from_manifest(spec: str, split: str) -> list[str] | None:
        shards = _manifest_shards(spec, split)
        if shards is None:
            return None
        counts[f"{split}_samples"] = sum(int(e.get("samples", 0)) for _, e in shards)
        counts[f"{split}_pairs"] = sum(int(e.get("pairs", 0)) for _, e in shards)
        if expected is not None:
            expected.update(shards)
        return [path for path, _ in shards]

    train = from_manifest(train_shards, "train")
    train_urls: str | list[str] = train if train is not None else train_shards
    val_urls: str | list[str] | None
    if val_shards is not None:
        val = from_manifest(val_shards, "val")
        val_urls = val if val is not None else val_shards
    elif train is not None:
        val = from_manifest(train_shards, "val")
        val_urls = val or None
    else:
        val_urls = None
    return train_urls, val_urls, counts


# "pipe:", "http:", "s3:", "file:"...: a scheme of two letters or more (not a drive letter).
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def _manifest_shards(spec: str, split: str | None) -> list[tuple[str, dict]] | None:
    """``(absolute path, entry)`` of the manifest's shards (of one split, or all) when ``spec`` is a
    local build directory; ``None`` when it is a URL, a file or a brace pattern for WebDataset."""
    path = Path(spec)
    if "://" in spec or _URL_SCHEME.match(spec) or not path.is_dir():
        return None
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path} is a directory without manifest.json")
    manifest = load_manifest(path)
    entries = manifest.get("shards", []) if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        raise ManifestError(f"{path / 'manifest.json'}: 'shards' is not a list")
    return [(_manifest_shard_path(path, e), e) for e in entries if split is None or (isinstance(e, dict) and e.get("split") == split)]


def missing_shards(spec: str, flag: str) -> MissingShardsError | None:
    """The error for a local shard spec (directory, ``.tar``, brace pattern, ``::`` list) naming paths
    that do not exist yet - with the command that builds them - or ``None`` (URLs are not checked)."""
    if "://" in spec or spec.startswith("pipe:"):
        return None
    missing = [u for u in wds.shardlists.expand_urls(spec) if not Path(u).exists()]
    if not missing:
        return None
    first = Path(missing[0])
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    out = first if first.suffix != ".tar" else first.parent
    how = f"build them with `vpa-shard build INPUT... --out {out}`"
    if out.name == "shards":  # the layout `vpa-shard demo DIR` writes (DIR/shards)
        how += f", or the demo set with `vpa-shard demo {out.parent} --num-images 720 --val-fraction 0.2` (`vpa demo` builds and trains it)"
    return MissingShardsError(f"{flag}: {first}{more} does not exist (no shards built there yet); {how}")


def _manifest_shard_path(directory: Path, entry: Any) -> str:
    """Absolute path of one manifest shard. The name must be a plain relative path inside the build
    directory: a URL or ``pipe:`` command (WebDataset would run it), an absolute path, ``..`` or
    ``-`` (stdin) in a data file is refused, and the absolute result can never be read as a URL."""
    where = directory / "manifest.json"
    name = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: shard entry {str(entry)[:200]!r} has no 'path'")
    parts = PurePosixPath(name).parts
    if _URL_SCHEME.match(name) or "://" in name:
        raise ManifestError(f"{where}: shard path {name!r} is a URL or pipe; a manifest names files relative to it")
    if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name or name == "-":
        raise ManifestError(f"{where}: shard path {name!r} is not a file name relative to the manifest")
    return str(Path(os.path.abspath(directory)).joinpath(*parts))


def _test_urls(spec: str, expected: dict[str, dict] | None = None) -> str | list[str]:
    """``test_shards``: every shard (train and val split) of a manifest directory, else the spec as is."""
    shards = _manifest_shards(spec, None)
    if shards is None:
        return spec
    if expected is not None:
        expected.update(shards)
    return [path for path, _ in shards]


def _local_path(url: str) -> str | None:
    """The local file a WebDataset URL opens, or ``None`` for a pipe, a remote URL or stdin."""
    if url.startswith("file:"):
        return url2pathname(urlparse(url).path)
    if url == "-" or _URL_SCHEME.match(url):
        return None
    return url


def _tar_is_empty(path: str) -> bool:
    """Whether a tar archive holds no member (an empty file counts); other read errors raise."""
    try:
        with tarfile.open(path, "r:*") as tf:
            return tf.next() is None
    except tarfile.ReadError as exc:
        if os.path.getsize(path) == 0 or "empty" in str(exc):
            return True
        raise BadShardsError(f"shard {path} is not a readable tar archive: {exc}") from exc


def check_shards(urls: str | list[str], expected: dict[str, dict], verify: str = "size", what: str = "shards") -> None:
    """Check before reading that every local shard exists as a regular file and that not all are
    empty; a shard named by a manifest must have the manifest's size (``verify="size"``), and its
    sha256 too with ``verify="hash"`` (``"none"``: no manifest check).

    Raises:
        MissingShardsError / BadShardsError: naming the shard path and the reason.
    """
    paths = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    if not paths:
        raise BadShardsError(f"{what}: no shards to read (an empty manifest split?)")
    empty = []
    for url in paths:
        local = _local_path(url)
        if local is None:
            continue
        origin = f" (named by {Path(local).parent / 'manifest.json'})" if url in expected else ""
        try:
            st = os.stat(local)
        except FileNotFoundError:
            raise MissingShardsError(f"{what}: shard {local}{origin} does not exist") from None
        except OSError as exc:
            raise BadShardsError(f"{what}: shard {local}{origin} cannot be read: {exc}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise BadShardsError(f"{what}: shard {local}{origin} is not a regular file")
        entry = expected.get(url)
        if entry is not None and verify != "none":
            stale = "the manifest does not describe the shards on disk (a stale manifest or a changed shard: rebuild)"
            if "bytes" in entry and st.st_size != int(entry["bytes"]):
                raise BadShardsError(
                    f"{what}: shard {local} is {st.st_size} bytes, its manifest says {entry['bytes']}: {stale}"
                )
            if verify == "hash" and entry.get("sha256"):
                digest = hashlib.sha256()
                with open(local, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                if digest.hexdigest() != entry["sha256"]:
                    raise BadShardsError(
                        f"{what}: shard {local} has sha256 {digest.hexdigest()}, its manifest says {entry['sha256']}: {stale}"
                    )
        if _tar_is_empty(local):
            empty.append(local)
    if empty and len(empty) == len(paths):
        raise BadShardsError(f"{what}: every shard is empty (no samples): {', '.join(empty)}")
    for path in empty:
        log.warning("%s: shard %s is empty (no samples)", what, path)


#: WebDataset's sample key of a tar member: the path up to the first dot of its file name.
_KEY = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def count_samples(path: str) -> int:
    """The samples of a local tar shard as WebDataset groups them (consecutive members sharing a key), from the
    member headers alone (no data read): the even split across ranks needs it where no manifest gives it."""
    samples, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                match = _KEY.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                if match.group(1) != last:
                    samples += 1
                    last = match.group(1)
    except tarfile.ReadError as exc:
        if os.path.getsize(path) == 0:
            return 0
        raise BadShardsError(f"shard {path} is not a readable tar archive: {exc}") from exc
    return samples
