"""Shards: read by the stock webdataset library, deterministic, atomic, partitionable, bounded memory."""

import hashlib
import json
import os
import subprocess
import sys
import tarfile

import pytest

from vpa_lightning.data import ManifestError, build, inspect, merge

from .conftest import make_dataset, read_samples

wds = pytest.importorskip("webdataset")


def digest_dir(out):
    m = json.loads((out / "manifest.json").read_text())
    return [(s["path"], s["sha256"]) for s in m["shards"]], m["counts"]


def test_stock_webdataset_reads_exactly_what_the_manifest_counts(tmp_path):
    files = make_dataset(tmp_path)
    out = tmp_path / "out"
    m = build(files, out, max_samples_per_shard=7, val_fraction=0.2)
    c = m["counts"]
    assert c["records_in"] == c["records_used"] + c["records_deduplicated"] + c["records_rejected"]
    assert c["records_deduplicated"] > 0 and c["groups_val"] > 0 and len(m["shards"]) > 2
    urls = [str(out / s["path"]) for s in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    groups = pairs = 0
    seen_keys = set()
    per_split = {"train": set(), "val": set()}
    shard_of = {str(out / s["path"]): s["split"] for s in m["shards"]}
    for sample in ds:
        js = sample["json"]
        # One sample, one image member named by the JSON (`{key}.0.png` -> field "0.png").
        (entry,) = js["images"]
        assert entry["member"] in ("0.png", "0.jpg") and entry["sha256"] == js["image_sha256"]
        img = sample[entry["member"]]
        assert img.size == (16, 12)
        assert js["key"] == sample["__key__"] and "." not in sample["__key__"]
        n = len(js["responses"])
        for p in js["pairs"]:
            assert 0 <= p["chosen"] < n and 0 <= p["rejected"] < n and p["chosen"] != p["rejected"]
            # all-pairs follows the mean score (Silkie); BT may disagree, so p can fall below 0.5.
            assert 0 < p["probability"] < 1
        groups += 1
        pairs += len(js["pairs"])
        seen_keys.add(sample["__key__"])
        per_split[shard_of[sample["__url__"]]].add(js["image_sha256"])
    assert groups == c["groups"] == len(seen_keys)
    assert pairs == c["pairs"]
    assert not per_split["train"] & per_split["val"], "an image is in both train and val"
    assert inspect(out)["ok"]


def test_same_input_and_seed_give_identical_bytes(tmp_path):
    files = make_dataset(tmp_path)
    build(files, tmp_path / "a", seed=3, max_samples_per_shard=10)
    build(files, tmp_path / "b", seed=3, max_samples_per_shard=10, threads=1)
    assert digest_dir(tmp_path / "a") == digest_dir(tmp_path / "b")
    build(files, tmp_path / "c", seed=4, max_samples_per_shard=10)
    assert digest_dir(tmp_path / "a")[0] != digest_dir(tmp_path / "c")[0]  # another shuffle
    a, c = read_samples(tmp_path / "a"), read_samples(tmp_path / "c")
    assert {k: v["json"] for k, v in a.items()} == {k: v["json"] for k, v in c.items()}  # same samples
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tf:
        for mem in tf.getmembers():
            assert (mem.mtime, mem.uid, mem.gid, mem.mode) == (1704067200, 0, 0, 0o644)


def test_spill_buckets_do_not_change_the_output(tmp_path):
    # Tiny buckets force many spill files (the bounded-memory path); bytes must not change.
    files = make_dataset(tmp_path)
    build(files, tmp_path / "one", seed=1)
    build(files, tmp_path / "many", seed=1, spill_bucket_bytes=2048)
    assert digest_dir(tmp_path / "one") == digest_dir(tmp_path / "many")
    # Buckets are ranges of the shuffle key, so a bucket's samples are written as soon as it is
    # ranked; near-duplicate merging buckets by image and spills the samples again by shuffle
    # key. With no near-duplicate prompt in the data the two paths must write the same bytes.
    for name, budget in (("near", 1 << 30), ("near-many", 2048)):
        m = build(files, tmp_path / name, seed=1, spill_bucket_bytes=budget, near_dup=0.99)
        assert m["counts"]["prompts_near_duplicate"] == 0
        assert digest_dir(tmp_path / name)[0] == digest_dir(tmp_path / "one")[0]


def test_killed_build_leaves_no_whole_looking_shard_and_rerun_completes(tmp_path):
    files = make_dataset(tmp_path)
    build(files, tmp_path / "clean", max_samples_per_shard=5, val_fraction=0)
    out = tmp_path / "killed"
    code = (
        "import sys; from vpa_lightning.data import build; "
        f"build({[str(f) for f in files]!r}, {str(out)!r}, max_samples_per_shard=5, val_fraction=0)"
    )
    env = dict(os.environ, RUST_PAIRS_TEST_ABORT_AFTER_SHARDS="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "aborting mid-shard" in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names
    assert [n for n in names if n.endswith(".tar")] == ["train-000000.tar", "train-000001.tar"]
    assert ".train-000002.tar.partial" in names
    build(files, out, max_samples_per_shard=5, val_fraction=0)
    assert digest_dir(out) == digest_dir(tmp_path / "clean")
    assert not [p for p in out.iterdir() if p.name.endswith(".partial") or p.name.startswith(".spill")]


def test_rebuild_with_fewer_shards_removes_stale_ones(tmp_path):
    files = make_dataset(tmp_path)
    out = tmp_path / "out"
    build(files, out, max_samples_per_shard=3, val_fraction=0)
    m = build(files, out, max_samples_per_shard=1000, val_fraction=0)
    assert sorted(p.name for p in out.glob("*.tar")) == [s["path"] for s in m["shards"]]


def sample_map(out):
    return {k: (v["json"], hashlib.sha256(v["image"]).hexdigest(), v["split"]) for k, v in read_samples(out).items()}


@pytest.mark.parametrize("same_dir", [True, False])
def test_partitions_merged_equal_a_single_build(tmp_path, same_dir):
    files = make_dataset(tmp_path)
    single = build(files, tmp_path / "single", val_fraction=0.2)
    n = 3
    dirs = []
    for i in range(n):
        d = tmp_path / ("parts" if same_dir else f"part{i}")
        m = build(files, d, val_fraction=0.2, partition=f"{i}/{n}")
        assert m["partition"] == [i, n]
        assert m["counts"]["records_in"] + m["counts"]["records_other_partitions"] + m["counts"]["blank_lines"] == \
            single["counts"]["records_in"] + single["counts"]["blank_lines"]
        dirs.append(d)
    dirs = sorted(set(dirs))
    merged = merge(dirs, tmp_path / "merged")
    assert merged["counts"] == single["counts"]
    assert sample_map(tmp_path / "merged") == sample_map(tmp_path / "single")
    assert inspect(tmp_path / "merged")["ok"]
    rej = lambda d: sorted((tmp_path / d / "rejects.jsonl").read_text().splitlines())  # noqa: E731
    assert rej("merged") == rej("single")
    lb = lambda d: json.loads((tmp_path / d / "report.json").read_text())["leaderboard"]  # noqa: E731
    assert [r["model"] for r in lb("merged")] == [r["model"] for r in lb("single")]
    assert [r["wins"] for r in lb("merged")] == [r["wins"] for r in lb("single")]


def test_merge_refuses_incomplete_partitions(tmp_path):
    files = make_dataset(tmp_path, n_images=6)
    build(files, tmp_path / "p", partition="0/2")
    with pytest.raises(ManifestError, match=r"partitions \[1\] of 2 are missing"):
        merge([tmp_path / "p"], tmp_path / "m")
    build(files, tmp_path / "p", partition="1/2", seed=9)
    with pytest.raises(ManifestError, match="different options"):
        merge([tmp_path / "p"], tmp_path / "m")


def test_inspect_detects_tampering(tmp_path):
    files = make_dataset(tmp_path, n_images=6)
    m = build(files, tmp_path / "out", val_fraction=0)
    shard = tmp_path / "out" / m["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = inspect(tmp_path / "out")
    assert not res["ok"] and "sha256" in " ".join(res["shards"][0]["problems"])


def test_inspect_checks_image_offsets(tmp_path):
    """``inspect`` checks that each image's ``offset`` lies in its prompt (chars, non-decreasing)."""
    import io
    import json
    import tarfile

    files = make_dataset(tmp_path, n_images=2)
    m = build(files, tmp_path / "out", val_fraction=0)
    assert inspect(tmp_path / "out")["ok"]
    shard = tmp_path / "out" / m["shards"][0]["path"]
    with tarfile.open(shard) as tf:
        members = [(info, tf.extractfile(info).read()) for info in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for info, data in members:
            if info.name.endswith(".json"):
                js = json.loads(data)
                assert [i["offset"] for i in js["images"]] == [0]
                js["images"][0]["offset"] = len(js["prompt"]) + 1
                data = json.dumps(js).encode()
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    problems = " ".join(inspect(tmp_path / "out")["shards"][0]["problems"])
    assert "image offsets" in problems and "do not place its 1 images" in problems
