"""``vpa-shard``: build, inspect, report on and merge preference-pair shards.

    vpa-shard build INPUT... --out DIR [--image-root DIR] [--format ...] [--field NAME=PATH ...]
                    [--recipe ...] [--strategy ...] ...
    vpa-shard inspect DIR
    vpa-shard report DIR
    vpa-shard merge DIR... [--out DIR]
    vpa-shard demo DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpa_lightning.data import shards

PROG = "vpa-shard"


def _table(rows: Sequence[tuple[str, Any]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    vals = [f"{v:,}" if isinstance(v, int) else str(v) for _, v in rows]
    vwidth = max(len(v) for v in vals)
    line = "-" * (width + vwidth + 5)
    out = [title, line]
    out += [f"  {k:<{width}}  {v:>{vwidth}}" for (k, _), v in zip(rows, vals)]
    out.append(line)
    return "\n".join(out)


SUMMARY_KEYS = (
    "records_in", "records_used", "records_deduplicated", "records_rejected", "responses_rejected",
    "responses_collapsed", "prompts_near_duplicate", "records_other_partitions", "groups", "groups_train",
    "groups_val", "pairs", "pairs_train", "pairs_val", "pairs_dropped_identical", "pairs_dropped_ties",
    "pairs_dropped_margin", "pairs_dropped_probability", "pairs_dropped_conflicting",
    "pairs_dropped_excluded", "groups_contradictory", "videos", "video_bytes",
)


def summary(manifest: dict[str, Any], seconds: float | None = None) -> str:
    c = manifest["counts"]
    rows: list[tuple[str, Any]] = [(k, c[k]) for k in SUMMARY_KEYS if k in c]
    rows.append(("shards", len(manifest["shards"])))
    rows.append(("shard bytes", sum(s["bytes"] for s in manifest["shards"])))
    if seconds is not None:
        rows.append(("seconds", f"{seconds:.2f}"))
        if seconds > 0:
            rows.append(("records/s", f"{c['records_in'] / seconds:,.0f}"))
    balanced = c["records_in"] == c["records_used"] + c["records_deduplicated"] + c["records_rejected"]
    rows.append(("in = used + dedup + rejected", "yes" if balanced else "NO"))
    text = _table(rows, "vpa-shard summary")
    files = manifest.get("files", [])
    if files:
        per_file = [(f["file"], f["skipped"] if f.get("skipped") else
                     f"{f['container']:<10} {f['layout'] or '?':<10} in {f['records_in']:>9,}  used {f['records_used']:>9,}  "
                     f"dedup {f['records_deduplicated']:>8,}  rejected {f['records_rejected']:>8,}") for f in files]
        text += "\n" + _table(per_file, "per file: container, layout, records")
    return text


def _add_build_args(p: argparse.ArgumentParser, *, inputs: bool = True) -> None:
    if inputs:
        p.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="files or directories: JSON lines, JSON arrays, Parquet (or a Hugging Face dataset folder), "
                            "InternVL/MMPR meta.json; recognised by content")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--image-root", default=None, help="directory relative image paths start from (default: each input's directory)")
        p.add_argument("--format", default="auto", choices=shards.formats(),
                       help="input layout (default: detected per file from its first records)")
        p.add_argument("--field", action="append", default=[], metavar="NAME=PATH",
                       help="declare where a row keeps prompt, image, video, chosen, rejected or id (dotted paths, e.g. chosen=answers.good); implies --format mapped")
        p.add_argument("--image-template", default=None, metavar="TEMPLATE",
                       help='image path built from the row\'s fields, e.g. "merged_images/{id}.jpg"')
        p.add_argument("--ref-logp-model", default=None, metavar="NAME",
                       help="model that the reference log-probs an input ships were computed with (recorded per pair)")
    names = [s[0] for s in shards.strategies()]
    p.add_argument("--strategy", default="all-pairs", choices=names,
                   help="; ".join(f"{n}: {h}" for n, h, _ in shards.strategies()))
    p.add_argument("--recipe", default=None, choices=[r[0] for r in shards.recipes()],
                   help="; ".join(f"{n}: {h}" for n, h in shards.recipes()))
    p.add_argument("--score", default=None, choices=["mean", "sum"], help="combine aspect ratings by weighted mean (default) or sum (MM-DPO)")
    p.add_argument("--dedup", default=None, choices=["exact", "normalized", "eos"],
                   help="exact (default): merge only exact duplicates; normalized: also case and Unicode form; eos: exact, end-of-sequence markers ignored")
    p.add_argument("--exclude-chosen-model", action="append", default=[], metavar="MODEL",
                   help="responses of MODEL may be rejected but never chosen (e.g. a gold answer); repeatable")
    p.add_argument("--min-margin", type=float, default=None, help="minimum weighted-mean-score gap of a pair (default: 2 for best-vs-rest, else any positive gap)")
    p.add_argument("--min-probability", type=float, default=0.75, help="Bradley-Terry probability threshold for min-probability (default 0.75)")
    p.add_argument("--aspects", default=None, help='declared aspects and weights, e.g. "Helpfulness=1,Visual Faithfulness=1,Ethical Considerations=1"')
    p.add_argument("--rating-range", default=None, metavar="LO:HI",
                   help="rating scale; ratings outside it reject their response (default: VLFeedback 1:5, HelpSteer 0:4 for rated rows with the default aspects)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of images held out for validation (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--max-samples-per-shard", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="bytes per shard at most (default 1 GiB)")
    p.add_argument("--partition", default="0/1", help="i/N: build the part of the output owned by partition i of N")
    p.add_argument("--near-dup", type=float, default=None, metavar="JACCARD", help="merge near-duplicate prompts on the same image at this MinHash Jaccard (off by default)")
    p.add_argument("--bt-prior", type=float, default=0.1, help="L2 prior on Bradley-Terry log-strengths (default 0.1)")
    p.add_argument("--max-text-chars", type=int, default=100_000, help="reject longer prompts or responses (default 100000)")
    p.add_argument("--max-record-bytes", type=int, default=64 << 20,
                   help="reject a record (line, array element, Parquet row's images) larger than this, unread (default 64 MiB)")
    p.add_argument("--max-responses", type=int, default=256, help="reject a record, or a group of pooled duplicates, with more responses (default 256)")
    p.add_argument("--image-check", default="structure", choices=["structure", "decode", "header"],
                   help="structure (default: container checks that catch truncated/corrupt files), decode (full pixel decode) or header")
    p.add_argument("--max-image-pixels", type=int, default=89_478_485,
                   help="reject images with more pixels (width x height, from the header, in every check mode; default 89478485 as Pillow)")
    p.add_argument("--max-video-bytes", type=int, default=2 << 30,
                   help="reject a video file larger than this, from its size before it is read (a frame sequence: its frames together; default 2 GiB)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--io-threads", type=int, default=16, help="threads validating records and reading images (default 16)")
    p.add_argument("--fsync", action="store_true", help="fsync each shard before renaming it into place (power-loss durability)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots of the report")


def _build_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        strategy=a.strategy, min_margin=a.min_margin, min_probability=a.min_probability, aspects=a.aspects, rating_range=a.rating_range,
        val_fraction=a.val_fraction, seed=a.seed, max_samples_per_shard=a.max_samples_per_shard,
        max_shard_bytes=a.max_shard_bytes, partition=a.partition, near_dup=a.near_dup, bt_prior=a.bt_prior,
        max_text_chars=a.max_text_chars, max_record_bytes=a.max_record_bytes, max_responses=a.max_responses, image_check=a.image_check, max_image_pixels=a.max_image_pixels, max_video_bytes=a.max_video_bytes, threads=a.threads, io_threads=a.io_threads, fsync=a.fsync,
        progress=not a.no_progress and sys.stderr.isatty(),
        recipe=a.recipe, score=a.score, dedup=a.dedup, exclude_chosen_models=a.exclude_chosen_model,
    )


def _run_build(inputs: list[str], out: str, image_root: str | None, fmt: str, a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    layout = dict(fields=getattr(a, "field", None), image_template=getattr(a, "image_template", None),
                  ref_logp_model=getattr(a, "ref_logp_model", None))
    try:
        manifest = shards.build(inputs, out, image_root=image_root, format=fmt, **layout, **_build_kwargs(a))
    except shards.EmptyBuildError as e:
        print(summary(e.manifest, time.perf_counter() - t0))
        raise
    dt = time.perf_counter() - t0
    print(summary(manifest, dt))
    report = manifest["report"]
    if not a.no_plots:
        from vpa_lightning.data.plots import render

        render(out, report)
    print(f"shards, manifest, {manifest['rejects']} and {report} in {out}")
    rejected = manifest["counts"]["records_rejected"] + manifest["counts"]["responses_rejected"]
    if rejected:
        print(f"{rejected} rejects with file, line and reason: {Path(out) / manifest['rejects']}")
    return manifest


def cmd_build(a: argparse.Namespace) -> int:
    _run_build(a.inputs, a.out, a.image_root, a.format, a)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    res = shards.inspect(a.dir, verify_hashes=not a.no_verify)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0 if res["ok"] else 1
    rows = [(s["path"], f"{s['split']:>5} {s['samples']:>7,} samples {s['pairs']:>8,} pairs  {'ok' if s['ok'] else '; '.join(s['problems'])}")
            for s in res["shards"]]
    print(_table(rows or [("(no shards)", "")], f"{a.dir}: {len(res['shards'])} shards"))
    print(f"samples {res['samples_found']:,} (manifest {res['counts']['groups']:,}), pairs {res['pairs_found']:,} (manifest {res['counts']['pairs']:,})")
    if res.get("example"):
        ex = res["example"]
        print(f"example sample {ex['key']}: {ex['prompt']!r}")
        for i, r in enumerate(ex["responses"]):
            print(f"  [{i}] strength {r['strength']:+.3f} {r['model'] or '-'}: {r['text'][:70]!r}")
        for p in ex["pairs"]:
            print(f"  pair {p['chosen']} > {p['rejected']}  p={p['probability']:.3f} margin={p['margin']:.2f}")
    print("OK" if res["ok"] else "PROBLEMS FOUND")
    return 0 if res["ok"] else 1


def cmd_report(a: argparse.Namespace) -> int:
    from vpa_lightning.data.plots import render

    manifest = shards.load_manifest(a.dir)
    report = json.loads((Path(a.dir) / manifest["report"]).read_text())
    if a.json:
        print(json.dumps({k: v for k, v in report.items() if k != "stats"}, indent=2))
        return 0
    print(summary(manifest))
    lb = report["leaderboard"]
    if lb:
        print(_table([(f"{r['rank']}. {r['model']}", f"strength {r['strength']:+.3f}  win rate {r['win_rate'] or 0:.3f}  ({r['comparisons']:g} comparisons)") for r in lb],
                     "Bradley-Terry leaderboard of the generating models"))
    corr = [c for c in report["aspect_correlations"] if c["pearson"] is not None]
    if corr:
        print(_table([(f"{c['a']} ~ {c['b']}", f"{c['pearson']:+.3f} (n={c['n']:,})") for c in corr], "Aspect correlations (Pearson)"))
    for p in render(a.dir, manifest["report"]):
        print(f"wrote {p}")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    m = shards.merge(a.dirs, a.out)
    print(summary(m))
    print(f"merged {len(m['merged_from'])} partitions into {Path(a.out or a.dirs[0]) / 'manifest.json'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from vpa_lightning.data.demo import make_demo

    root = Path(a.dir)
    ann = make_demo(root / "data", num_images=a.num_images, seed=a.seed)
    print(f"wrote {a.num_images} images and {ann}")
    if a.no_build:
        return 0
    _run_build([str(ann)], str(root / "shards"), None, "auto", a)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Preference annotations to deduplicated, Bradley-Terry-ranked pairs in WebDataset shards.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="validate, deduplicate, rank and write shards")
    _add_build_args(b)
    b.set_defaults(fn=cmd_build)
    i = sub.add_parser("inspect", help="verify shards against the manifest and show a sample")
    i.add_argument("dir")
    i.add_argument("--no-verify", action="store_true", help="skip sha256 checks")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    i.set_defaults(fn=cmd_inspect)
    r = sub.add_parser("report", help="print the leaderboard and correlations, render PNG plots")
    r.add_argument("dir")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(fn=cmd_report)
    m = sub.add_parser("merge", help="join partition builds into one manifest")
    m.add_argument("dirs", nargs="+", metavar="DIR")
    m.add_argument("--out", default=None, help="where the merged manifest goes (default: the first DIR)")
    m.set_defaults(fn=cmd_merge)
    d = sub.add_parser("demo", help="write the synthetic shapes set (DIR/data) and build it (DIR/shards)")
    d.add_argument("dir")
    d.add_argument("--num-images", type=int, default=720, help="images to draw (default 720, what configs/demo.yaml is tuned for)")
    d.add_argument("--no-build", action="store_true", help="only write the data")
    _add_build_args(d, inputs=False)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except shards.ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (shards.RustPairsError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no manifest was written (rerun the command to build)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
