"""Reliability of the data core (issue 13): nothing a user owns is touched, builds lock their
output, a manifest never describes other shards than those on disk, nothing hangs, bad images
and ratings are rejected with a reason. Processes that could hang run with a hard timeout."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vpa_lightning.data import OutputError, build, inspect

from .conftest import make_dataset, make_image, rejects, vlf_completion, vlf_row, write_jsonl

VPA_SHARD = str(Path(sys.executable).with_name("vpa-shard"))


def shard_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    exe = [VPA_SHARD] if os.path.exists(VPA_SHARD) else [sys.executable, "-m", "vpa_lightning.data.cli"]
    return subprocess.run([*exe, *args, "--no-plots", "--no-progress"], capture_output=True, text=True, timeout=timeout, **kw)


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --- 6. a user's files are never deleted ------------------------------------------------------

def test_out_holding_foreign_files_is_refused_and_left_alone(tmp_path):
    files = make_dataset(tmp_path, n_images=6)
    out = tmp_path / "out"
    (out / ".spill").mkdir(parents=True)
    (out / ".spill" / "keep.bin").write_bytes(b"user spill data")
    (out / "train-000000.tar").write_bytes(b"someone else's shard")
    before = listing(out)
    proc = shard_cli("build", *map(str, files), "--out", str(out))
    assert proc.returncode != 0
    assert str(out) in proc.stderr and "holds no vpa-shard build" in proc.stderr and "--out" in proc.stderr
    assert listing(out) == before


def test_rebuild_refuses_a_shard_its_manifest_does_not_list(tmp_path):
    files = make_dataset(tmp_path, n_images=6)
    out = tmp_path / "out"
    build(files, out, val_fraction=0)
    (out / "train-000007.tar").write_bytes(b"copied in by the user")
    with pytest.raises(OutputError, match=r"train-000007.tar is not listed"):
        build(files, out, val_fraction=0, seed=1)
    assert (out / "train-000007.tar").read_bytes() == b"copied in by the user"
    assert inspect(out)["ok"]  # the earlier build is untouched


# --- 7. concurrent builds into one --out ------------------------------------------------------

def test_a_build_fails_fast_while_another_holds_the_lock(tmp_path):
    files = make_dataset(tmp_path, n_images=4)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".vpa-shard.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = shard_cli("build", *map(str, files), "--out", str(out), timeout=60)
    assert proc.returncode == 1 and "another vpa-shard build is writing there" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".vpa-shard.lock"]


def test_two_concurrent_builds_never_mix(tmp_path):
    files = make_dataset(tmp_path, n_images=30)
    out = tmp_path / "out"
    exe = [VPA_SHARD] if os.path.exists(VPA_SHARD) else [sys.executable, "-m", "vpa_lightning.data.cli"]
    procs = [
        subprocess.Popen([*exe, "build", *map(str, files), "--out", str(out), "--seed", str(s), "--max-samples-per-shard", "2",
                          "--no-plots", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for s in (1, 2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, err in results:
        assert rc == 0 or "another vpa-shard build is writing there" in err, err
    # Whatever ran last, the manifest describes exactly the shards on disk.
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["path"] for s in m["shards"])
    assert inspect(out)["ok"]


# --- 8. the manifest never describes other shards ---------------------------------------------

def test_killed_rebuild_over_a_finished_build_leaves_no_stale_manifest(tmp_path):
    files = make_dataset(tmp_path)
    clean = tmp_path / "clean"
    build(files, clean, max_samples_per_shard=5, val_fraction=0, seed=1)
    out = tmp_path / "out"
    build(files, out, max_samples_per_shard=5, val_fraction=0, seed=0)
    code = (
        "from vpa_lightning.data import build; "
        f"build({[str(f) for f in files]!r}, {str(out)!r}, max_samples_per_shard=5, val_fraction=0, seed=1)"
    )
    env = dict(os.environ, RUST_PAIRS_TEST_ABORT_AFTER_SHARDS="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "aborting mid-shard" in proc.stderr
    # New shards 0 and 1 sit beside old ones: no manifest may describe that mixture.
    assert not (out / "manifest.json").exists()
    m = build(files, out, max_samples_per_shard=5, val_fraction=0, seed=1)
    ref = json.loads((clean / "manifest.json").read_text())
    assert [(s["path"], s["sha256"]) for s in m["shards"]] == [(s["path"], s["sha256"]) for s in ref["shards"]]
    assert sorted(p.name for p in out.glob("*.tar")) == [s["path"] for s in m["shards"]]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".vpa-shard.lock"]


# --- 1. nothing hangs -------------------------------------------------------------------------

def good_pair(img: str, prompt: str = "Q?") -> dict:
    return vlf_row(img, prompt, [vlf_completion("a", "yes", (5, 5, 5)), vlf_completion("b", "no", (1, 1, 1))])


def test_an_image_path_that_is_a_fifo_is_rejected_without_blocking(tmp_path):
    make_image(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    data = write_jsonl(tmp_path / "in.jsonl", [good_pair("pipe.png"), good_pair("ok.png")])
    out = tmp_path / "out"
    # A hard timeout: the regression blocks in open() forever, and must fail here, not hang CI.
    proc = shard_cli("build", str(data), "--out", str(out), "--val-fraction", "0", timeout=60)
    assert proc.returncode == 0, proc.stderr
    (rej,) = [r for r in rejects(out) if r["kind"] == "record"]
    assert rej["line"] == 1 and rej["field"] == "image" and "not a regular file (a FIFO)" in rej["reason"]
    assert json.loads((out / "manifest.json").read_text())["counts"]["records_used"] == 1


def test_an_input_that_is_a_fifo_fails_or_is_skipped_without_blocking(tmp_path):
    # Hard timeouts throughout: the regression blocks in open() forever and must fail here, not hang CI.
    make_image(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.jsonl")
    out = tmp_path / "out"
    # Named on the command line: the build stops (exit 1) naming the file and what was expected.
    proc = shard_cli("build", str(tmp_path / "pipe.jsonl"), "--out", str(out), timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"{tmp_path / 'pipe.jsonl'}: not a regular file (a FIFO); expected a data file" in proc.stderr
    # Found in a directory input: reported per file, unopened, while the other files build.
    d = tmp_path / "dataset"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [good_pair(str(tmp_path / "ok.png"))])
    os.mkfifo(d / "b.jsonl")
    proc = shard_cli("build", str(d), "--out", str(out), "--val-fraction", "0", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{d / 'b.jsonl'}" in proc.stdout and "not read: not a regular file (a FIFO)" in proc.stdout
    files = {f["file"]: f for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert files[str(d / "a.jsonl")]["records_used"] == 1
    assert "not a regular file (a FIFO)" in files[str(d / "b.jsonl")]["skipped"]
    # Named by an MMPR meta.json: like a file on the command line.
    (d / "b.jsonl").unlink()
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"src": {"root": ".", "annotation": "pipe.jsonl"}}))
    proc = shard_cli("build", str(meta), "--out", str(tmp_path / "out2"), timeout=60)
    assert proc.returncode == 1 and "pipe.jsonl: not a regular file (a FIFO)" in proc.stderr, proc.stderr


# --- 4. image bombs ---------------------------------------------------------------------------

def png_claiming(path: Path, w: int, h: int) -> Path:
    """A well-formed PNG container (valid CRCs) whose header claims w x h pixels: a bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("mode", ["structure", "header", "decode"])
def test_pixel_limit_holds_in_every_check_mode(tmp_path, mode):
    png_claiming(tmp_path / "bomb.png", 100_000, 100_000)
    make_image(tmp_path / "ok.png", size=(16, 12))
    make_image(tmp_path / "big.png", size=(40, 30))
    data = write_jsonl(tmp_path / "in.jsonl", [good_pair("bomb.png"), good_pair("big.png"), good_pair("ok.png")])
    m = build([data], tmp_path / "out", image_check=mode, max_image_pixels=1000, val_fraction=0)
    reasons = {r["line"]: r["reason"] for r in rejects(tmp_path / "out") if r["kind"] == "record"}
    assert "100000x100000 = 10000000000 pixels, over the limit of 1000 (--max-image-pixels" in reasons[1]
    assert "40x30 = 1200 pixels" in reasons[2]
    assert m["counts"]["records_used"] == 1
    # The default (Pillow's 89,478,485) stops the bomb too.
    m = build([data], tmp_path / "out2", image_check=mode, val_fraction=0)
    assert m["counts"]["records_used"] == 2 and m["counts"]["records_rejected"] == 1


def test_decode_rejects_a_jpeg_cut_after_its_scan_header(tmp_path):
    make_image(tmp_path / "full.jpg", size=(64, 48), fmt="JPEG")
    b = (tmp_path / "full.jpg").read_bytes()
    sos = b.index(b"\xff\xda")
    (tmp_path / "cut.jpg").write_bytes(b[: sos + 2 + int.from_bytes(b[sos + 2:sos + 4], "big")])
    data = write_jsonl(tmp_path / "in.jsonl", [good_pair("cut.jpg"), good_pair("full.jpg")])
    for mode in ("structure", "decode"):
        m = build([data], tmp_path / mode, image_check=mode, val_fraction=0)
        (rej,) = [r for r in rejects(tmp_path / mode) if r["kind"] == "record"]
        assert rej["line"] == 1 and "does not decode" in rej["reason"], (mode, rej)
        assert m["counts"]["records_used"] == 1


# --- 5. ratings out of scale ------------------------------------------------------------------

def test_ratings_off_the_known_scale_reject_their_response(tmp_path):
    make_image(tmp_path / "ok.png")
    comps = [vlf_completion(f"m{i}", f"answer {i}", (r, 3, 3)) for i, r in enumerate(["-5", 0, 6, 1000, 4, "2"])]
    data = write_jsonl(tmp_path / "in.jsonl", [vlf_row("ok.png", "Q?", comps)])
    m = build([data], tmp_path / "out", val_fraction=0)
    rej = [r for r in rejects(tmp_path / "out") if r["kind"] == "response"]
    assert [r["field"] for r in rej] == [f"completions[{i}].annotations.Helpfulness" for i in range(4)]
    assert all("outside VLFeedback's scale 1..5" in r["reason"] and "--rating-range" in r["reason"] for r in rej)
    assert m["counts"]["responses_rejected"] == 4 and m["counts"]["records_used"] == 1
    # A declared scale takes them.
    m = build([data], tmp_path / "wide", val_fraction=0, rating_range="-10:1000")
    assert m["counts"]["responses_rejected"] == 0
    proc = shard_cli("build", str(data), "--out", str(tmp_path / "bad"), "--rating-range", "5:1")
    assert proc.returncode == 2 and "--rating-range" in proc.stderr


def test_huge_ratings_never_make_a_margin_null(tmp_path):
    make_image(tmp_path / "ok.png")
    aspects = ("helpfulness", "clarity")
    resp = lambda t, a, b: {"text": t, "scores": dict(zip(aspects, (a, b)))}  # noqa: E731
    rows = [{"prompt": "Q?", "image": "ok.png", "responses": [
        resp("a", 1.7e308, 1.7e308), resp("b", -1.7e308, -1.7e308), resp("c", 3, 1), resp("d", 1, 1), resp("e", 2e14, 1)]}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    m = build([data], tmp_path / "out", aspects="helpfulness,clarity", val_fraction=0)
    rej = [r for r in rejects(tmp_path / "out") if r["kind"] == "response"]
    assert [r["field"] for r in rej] == ["responses[0].scores.helpfulness", "responses[1].scores.helpfulness"]
    assert all("beyond ±1e15" in r["reason"] for r in rej)
    (sample,) = [json.loads(line) for line in _sample_jsons(tmp_path / "out")]
    assert len(sample["pairs"]) == 3 and all(isinstance(p["margin"], float) for p in sample["pairs"])
    assert m["counts"]["records_used"] == 1


def _sample_jsons(out: Path) -> list[bytes]:
    import tarfile

    m = json.loads((out / "manifest.json").read_text())
    found = []
    for s in m["shards"]:
        with tarfile.open(out / s["path"]) as tf:
            found += [tf.extractfile(x).read() for x in tf.getmembers() if x.name.endswith(".json")]
    return found


# --- 2. ranking is bounded and linear in the comparisons present ------------------------------

def many_responses(img: str, k: int, tag: str = "") -> dict:
    return vlf_row(img, "Q?", [vlf_completion(f"m{i % 9}", f"answer {tag}{i}", (1 + i % 5, 1 + i * 7 % 5, 3)) for i in range(k)])


def test_responses_per_group_are_bounded_with_a_reason(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", colour=(1, 2, 3))
    rows = [many_responses("a.png", 300), many_responses("b.png", 200, "x"), many_responses("b.png", 200, "y")]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    m = build([data], tmp_path / "out", val_fraction=0, allow_empty=True)  # every record is over the limit
    rej = {r["line"]: r for r in rejects(tmp_path / "out") if r["kind"] == "record"}
    assert "300 responses, over the limit of 256 per group (--max-responses)" in rej[1]["reason"]
    # Two records of 200 pooled as duplicates: 400 distinct responses in one group.
    assert "400 distinct responses after deduplication, over the limit of 256 (--max-responses)" in rej[2]["reason"]
    assert rej[3]["reason"] == rej[2]["reason"] and m["counts"]["records_rejected"] == 3
    m = build([data], tmp_path / "wide", val_fraction=0, max_responses=400, strategy="best-vs-worst")
    assert m["counts"]["records_used"] == 2 and m["counts"]["records_deduplicated"] == 1


def test_bradley_terry_memory_is_linear_in_the_comparisons(tmp_path):
    # 2·10⁴ items and 3·10⁴ comparisons: the old dense fit allocated two 3.2 GB matrices.
    code = (
        "from vpa_lightning.data import bradley_terry; n = 20_000; "
        "th = bradley_terry(n, [(i, i + 1, 1.0) for i in range(n - 1)] + [(i, i + 2, 1.0) for i in range(0, n - 2, 2)]); "
        "assert len(th) == n and th[0] > th[-1]; print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < 400_000, f"peak RSS {proc.stdout} KiB"


# --- 3. memory is bounded whatever the number of records ------------------------------------------

def test_build_memory_is_bounded_by_the_spill_budget_not_the_records(tmp_path):
    # 10⁶ tiny records peaked at 1.77 GB: buckets were sized by input bytes, so an input under one
    # bucket was held whole in parsed form (~2-4 KB a tiny record). A bucket now holds at most one
    # record per 2 KiB of spill_bucket_bytes (here 8 MiB: 4096 records), and one that outgrows it
    # is split. The old code held all 80,000 (+255 MB measured; now +35-67 MB, mostly fixed
    # costs). Each build runs in a subprocess so that its own peak (VmHWM) is read.
    from .test_containers import MEMORY_SCRIPT

    growth = {}
    for n in (10_000, 80_000):
        data = write_jsonl(tmp_path / f"in{n}.jsonl", [{"question": f"Q{i}?", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(n)])
        opts = {"inputs": [str(data)], "out": str(tmp_path / f"out{n}"), "val_fraction": 0, "spill_bucket_bytes": 8 << 20, "threads": 2}
        p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(opts)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        res = json.loads(p.stdout)
        assert res["counts"]["records_used"] == n
        growth[n] = (res["peak_kb"] - res["base_kb"]) / 1024
    assert growth[80_000] < 120 and growth[80_000] < growth[10_000] + 80, f"peak growth MB by records: {growth}"
    # Spilled and split or held in memory, the shards are the same bytes.
    whole = build([tmp_path / "in10000.jsonl"], tmp_path / "whole", val_fraction=0, spill_bucket_bytes=1 << 30)
    spilled = json.loads((tmp_path / "out10000" / "manifest.json").read_text())
    assert [s["sha256"] for s in whole["shards"]] == [s["sha256"] for s in spilled["shards"]]


# --- 9. Ctrl-C ----------------------------------------------------------------------------------

def test_ctrl_c_stops_a_build_at_once_and_leaves_no_shard(tmp_path):
    import signal
    import time

    import numpy as np
    from PIL import Image

    # Slow enough: every record decodes the same 600x600 noise PNG (--image-check decode).
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    data = write_jsonl(tmp_path / "in.jsonl", [good_pair("big.png", f"Question {i}?") for i in range(20000)])
    out = tmp_path / "out"
    exe = [VPA_SHARD] if os.path.exists(VPA_SHARD) else [sys.executable, "-m", "vpa_lightning.data.cli"]
    proc = subprocess.Popen([*exe, "build", str(data), "--out", str(out), "--image-check", "decode", "--max-samples-per-shard", "1", "--io-threads", "2",
                             "--no-plots", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".vpa-shard.journal").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the build did not start"
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "the input was not slow enough to interrupt"
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert rc == 130, proc.stderr.read()
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"  # debug build, loaded CI: generous; ~0.1-1 s measured
    assert "interrupted" in proc.stderr.read()
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.endswith((".tar", ".partial")) or n.startswith(("manifest", ".spill"))], left
    # The folder is still recognised as a build: a new one goes ahead.
    small = write_jsonl(tmp_path / "small.jsonl", [good_pair("big.png")])
    assert build([small], out, val_fraction=0)["counts"]["records_used"] == 1
