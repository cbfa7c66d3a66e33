"""Shard-build benchmark: the Rust builder against a plain-Python reference, side by side.

    python benchmarks/shard_build.py --records 100000 --workdir /tmp/vpa-bench

Generates (once, cached in the workdir) VLFeedback-style records with 4 responses x 3 aspects
and one small real JPEG per record (plus 2% exact duplicates and 0.5% bad lines), then in one
run: the Rust build (``vpa_lightning.data.build``), the plain-Python reference build
(``reference_build.py``: json + hashlib + tarfile + a Python Bradley-Terry fit), a plain
file copy of the same images, and the I/O floor (``io_floor/``, Rust, built with cargo when it is
on PATH: read the annotations, read + sha256 every image in parallel, write as many bytes as the
build's shards hold while hashing them, and nothing else: no build can be faster on this
machine; the image-only variant writes just the image bytes). Each build runs in its own process so peak RSS is its own. The
two builds must produce the same samples (keys, pairs, strengths) before any ratio is reported.
Results go to stdout and ``benchmarks/results/shard_build.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = [f"vlm-{k:02d}" for k in range(12)]
ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


def generate(work: Path, records: int, seed: int = 0) -> Path:
    from PIL import Image

    ann = work / "annotations.jsonl"
    stamp = work / f".generated-{records}-{seed}"
    if stamp.exists():
        return ann
    rng = random.Random(seed)
    img_dir = work / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    base = Image.effect_noise((96, 96), 40).convert("RGB")
    lines = []
    for i in range(records):
        name = f"images/{i // 1000:03d}/{i:07d}.jpg"
        p = work / name
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            img = Image.new("RGB", (96, 96), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
            img = Image.blend(img, base.rotate(rng.randrange(360)), 0.35)
            img.save(p, format="JPEG", quality=85)
        comps = []
        for m in rng.sample(MODELS, 4):
            ratings = [rng.randint(1, 5) for _ in ASPECTS]
            comps.append({"model": m, "response": f"{m} says: the picture {i} shows item {rng.randrange(10**6)}.",
                          "annotations": {a: {"Rating": str(r), "Rationale": "The answer " + "is plausible " * 6}
                                          for a, r in zip(ASPECTS, ratings)}})
        lines.append(json.dumps({"id": str(i), "prompt": f"<image>\nQuestion {i % 5000}: what is in this picture?",
                                 "img_path": name, "models": [c["model"] for c in comps], "completions": comps}))
    extra = []
    for k in range(records // 50):  # exact duplicates, as merged datasets have
        extra.append(lines[rng.randrange(records)])
    for k in range(records // 200):  # bad lines
        extra.append('{"id": "broken", "prompt": ' if k % 2 else lines[rng.randrange(records)].replace('"Rating": "', '"Rating": "N/A', 1))
    lines += extra
    ann.write_text("\n".join(lines) + "\n")
    stamp.touch()
    return ann


CHILD = r"""
import json, sys, time
sys.path.insert(0, {here!r})
from vpa_lightning.data import build
import reference_build
t0 = time.perf_counter()
if {which!r} == "rust":
    m = build([{ann!r}], {out!r}, strategy="all-pairs", seed=0, val_fraction=0.05, max_samples_per_shard=1000, threads={threads!r},
              image_check={mode!r})
    counts = m["counts"]
else:
    counts = reference_build.build([{ann!r}], {out!r}, seed=0, val_fraction=0.05, max_samples=1000, image_check={mode!r})["counts"]
dt = time.perf_counter() - t0
# VmHWM is this process's own peak; ru_maxrss would include the parent's RSS at fork.
hwm_kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({{"seconds": dt, "peak_rss_mb": hwm_kb / 1024, "counts": counts}}))
"""


def run_child(which: str, ann: Path, out: Path, threads: int | None, mode: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    code = CHILD.format(here=str(HERE), which=which, ann=str(ann), out=str(out), threads=threads, mode=mode)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def samples(out: Path) -> dict[str, dict]:
    res = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    js = json.loads(tf.extractfile(m).read())
                    res[js["key"]] = js
    return res


def same_output(a: Path, b: Path) -> tuple[bool, str]:
    sa, sb = samples(a), samples(b)
    if sa.keys() != sb.keys():
        return False, f"keys differ: {len(sa)} vs {len(sb)}"
    for k, x in sa.items():
        y = sb[k]
        if [(p["chosen"], p["rejected"]) for p in x["pairs"]] != [(p["chosen"], p["rejected"]) for p in y["pairs"]]:
            return False, f"pairs differ in {k}"
        if [r["text"] for r in x["responses"]] != [r["text"] for r in y["responses"]]:
            return False, f"response order differs in {k}"
        if any(abs(r["strength"] - s["strength"]) > 1e-8 for r, s in zip(x["responses"], y["responses"])):
            return False, f"strengths differ in {k}"
    order = lambda d: [m.name for t in sorted(d.glob("*.tar")) for m in tarfile.open(t).getmembers()]  # noqa: E731
    if order(a) != order(b):
        return False, "sample order differs"
    return True, f"{len(sa)} samples identical in keys, order, pairs and strengths (both merge exact duplicates only, as --dedup exact)"


def copy_images(work: Path) -> tuple[float, int]:
    dest = work / "copy"
    if dest.exists():
        shutil.rmtree(dest)
    t0 = time.perf_counter()
    n = 0
    for src in sorted((work / "images").rglob("*.jpg")):
        d = dest / src.relative_to(work / "images")
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d)
        n += src.stat().st_size
    dt = time.perf_counter() - t0
    shutil.rmtree(dest)
    return dt, n


def io_floor(work: Path, ann: Path, repeat: int, out_bytes: int) -> dict | None:
    """Seconds of the bare I/O any build of this set must do (fastest of ``repeat``); None without cargo.

    ``seconds`` writes ``out_bytes`` (the shards' total size, as every build must);
    ``image_only_seconds`` writes just the image bytes (a looser bound, shown for comparison).
    """
    if shutil.which("cargo") is None:
        return None
    root = HERE.parent
    target = root / "target" / "io_floor"
    subprocess.run(["cargo", "build", "--quiet", "--release", "--manifest-path", str(HERE / "io_floor" / "Cargo.toml"),
                    "--target-dir", str(target)], check=True)
    runs, image_only = [], []
    for _ in range(repeat):  # interleaved: both variants see the same machine noise
        for extra, into in (([str(out_bytes)], runs), ([], image_only)):
            out = subprocess.run([str(target / "release" / "io_floor"), str(ann), str(work / "images"), str(work / "floor.bin"), *extra],
                                 capture_output=True, text=True, check=True)
            into.append(json.loads(out.stdout)["seconds"])
    return {"seconds": min(runs), "out_bytes": out_bytes, "runs_seconds": runs,
            "image_only_seconds": min(image_only), "image_only_runs_seconds": image_only}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--workdir", default="/tmp/vpa-bench")
    ap.add_argument("--threads", type=int, default=None, help="Rust worker threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each build; the fastest counts (the machine is noisy)")
    ap.add_argument("--generate-only", action="store_true", help="only write the data set")
    ap.add_argument("--out", default=str(HERE / "results" / "shard_build.json"))
    ap.add_argument("--image-check", nargs="+", default=["structure", "decode"], choices=["structure", "decode", "header"],
                    help="validation levels to compare (each runs both builds)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ann = generate(work, args.records)
    gen_s = time.perf_counter() - t0
    if args.generate_only:
        print(f"generated {args.records:,} records in {work} ({gen_s:.0f}s)")
        return
    n_lines = sum(1 for line in ann.open() if line.strip())
    # Warm the page cache the same way for everyone: one copy before timing.
    copy_images(work)
    copy_s, image_bytes = copy_images(work)
    modes = {}
    all_ok = True
    for mode in args.image_check:
        # Interleaved runs, fastest of each kept: both builds see the same machine noise.
        rust_runs, py_runs = [], []
        for _ in range(args.repeat):
            rust_runs.append(run_child("rust", ann, work / "out-rust", args.threads, mode))
            py_runs.append(run_child("python", ann, work / "out-python", None, mode))
        rust = min(rust_runs, key=lambda r: r["seconds"])
        py = min(py_runs, key=lambda r: r["seconds"])
        ok, why = same_output(work / "out-rust", work / "out-python")
        rc, pc = rust["counts"], py["counts"]
        counts_match = all(rc[k] == pc[k] for k in ("records_in", "records_used", "records_deduplicated", "records_rejected", "groups", "pairs"))
        all_ok &= ok and counts_match
        modes[mode] = {
            "rust": {"seconds": rust["seconds"], "records_per_s": n_lines / rust["seconds"], "peak_rss_mb": rust["peak_rss_mb"],
                     "image_mb_per_s": image_bytes / rust["seconds"] / 1e6},
            "python_reference": {"seconds": py["seconds"], "records_per_s": n_lines / py["seconds"], "peak_rss_mb": py["peak_rss_mb"]},
            "speedup_records_per_s": py["seconds"] / rust["seconds"],
            "image_throughput_fraction_of_copy": copy_s / rust["seconds"],
            "runs_seconds": {"rust": [r["seconds"] for r in rust_runs], "python_reference": [r["seconds"] for r in py_runs]},
            "outputs_identical": ok,
            "outputs_check": why,
            "counts_match": counts_match,
            "counts": rc,
        }
    # The floor writes as many bytes as the shards hold (the same for every mode: outputs are identical).
    out_bytes = sum(p.stat().st_size for p in (work / "out-rust").glob("*.tar"))
    floor = io_floor(work, ann, max(args.repeat, 3), out_bytes)
    for r in modes.values():
        # how far the Rust build is from the bare I/O, and the best speed-up any build could show here
        r["rust_seconds_over_io_floor"] = r["rust"]["seconds"] / floor["seconds"] if floor else None
        r["speedup_bound_at_io_floor"] = r["python_reference"]["seconds"] / floor["seconds"] if floor else None
    res = {
        "command": f"python benchmarks/shard_build.py --records {args.records} --workdir {args.workdir}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "records": n_lines,
        "image_bytes": image_bytes,
        "generate_seconds": round(gen_s, 2),
        "file_copy": {"seconds": copy_s, "image_mb_per_s": image_bytes / copy_s / 1e6},
        "io_floor": floor,
        "image_check": modes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"records: {n_lines:,} ({image_bytes / 1e6:.0f} MB of JPEG), {os.cpu_count()} cores; "
          f"plain file copy of the images: {res['file_copy']['image_mb_per_s']:.0f} MB/s"
          + (f"; I/O floor {floor['seconds']:.2f} s ({floor['out_bytes'] / 1e6:.0f} MB written; "
             f"{floor['image_only_seconds']:.2f} s writing the images alone)" if floor else ""))
    print(f"{'image check':12}{'build':24}{'seconds':>9}{'records/s':>11}{'peak RSS MB':>13}{'image MB/s':>12}")
    for mode, r in modes.items():
        print(f"{mode:12}{'rust (vpa-shard)':24}{r['rust']['seconds']:>9.2f}{r['rust']['records_per_s']:>11,.0f}"
              f"{r['rust']['peak_rss_mb']:>13.0f}{r['rust']['image_mb_per_s']:>12.0f}")
        print(f"{'':12}{'plain-Python reference':24}{r['python_reference']['seconds']:>9.2f}"
              f"{r['python_reference']['records_per_s']:>11,.0f}{r['python_reference']['peak_rss_mb']:>13.0f}")
        print(f"{'':12}speed-up {r['speedup_records_per_s']:.1f}x; rust image throughput = {r['image_throughput_fraction_of_copy']:.2f} "
              f"of a file copy; outputs identical: {r['outputs_identical']} ({r['outputs_check']})")
        if floor:
            print(f"{'':12}rust = {r['rust_seconds_over_io_floor']:.1f}x the I/O floor; "
                  f"no build could beat {r['speedup_bound_at_io_floor']:.1f}x here")
    if not all_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
