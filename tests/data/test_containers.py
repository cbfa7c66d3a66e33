"""Containers recognised by content: JSON arrays (streamed), JSON lines in a .json, a BOM,
Parquet in the `datasets` layout (single files and a Hugging Face dataset folder), InternVL/MMPR
meta.json, directories; read back through the stock WebDataset reader for exact texts and bytes.
Exit codes of `vpa-shard build` through the console script; bounded memory for huge records."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from vpa_lightning.data import EmptyBuildError, InputFileError, build, inspect

from .conftest import rejects, write_jsonl

# How `datasets` stores an `Image()` feature in Parquet, and the schema metadata it writes.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def img_bytes(colour, fmt="PNG", size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def read_back(out: Path) -> dict[str, dict]:
    """prompt -> {"chosen", "rejected", "images": [bytes...], "members": [...]} via stock WebDataset."""
    m = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["path"]) for s in m["shards"]]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        js = json.loads(sample["json"])
        texts = [r["text"] for r in js["responses"]]
        (p,) = js["pairs"]
        members = [i["member"] for i in js["images"]]
        got[js["prompt"]] = {
            "chosen": texts[p["chosen"]],
            "rejected": texts[p["rejected"]],
            "images": [sample[mb] for mb in members],
            "members": members,
            "source": js["source"],
        }
    return got


def pairwise(i: int, image) -> dict:
    return {"image": image, "question": f"Question {i}?", "chosen": f"right {i}", "rejected": f"wrong {i}"}


def test_json_arrays_pretty_and_one_line_stream_with_element_positions(tmp_path):
    png, jpg = img_bytes((200, 0, 0)), img_bytes((0, 0, 200), "JPEG")
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "b.jpg").write_bytes(jpg)
    rows = [pairwise(0, "a.png"), pairwise(1, "b.jpg"), {"image": "a.png", "question": 3, "chosen": "x", "rejected": "y"}]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "line.json").write_text(json.dumps(rows))
    for name in ("pretty.json", "line.json"):
        out = tmp_path / f"out-{name}"
        m = build([tmp_path / name], out, val_fraction=0)
        got = read_back(out)
        assert got["Question 0?"]["chosen"] == "right 0" and got["Question 0?"]["rejected"] == "wrong 0"
        assert got["Question 0?"]["images"] == [png] and got["Question 1?"]["images"] == [jpg]
        assert got["Question 1?"]["members"] == ["0.jpg"]
        (f,) = m["files"]
        assert (f["container"], f["layout"], f["records_in"], f["records_used"], f["records_rejected"]) == ("json-array", "pairwise", 3, 2, 1)
        (r,) = rejects(out)
        assert (r["index"], r["field"]) == (2, "question")
        # the line where the element starts
        text = (tmp_path / name).read_text()
        start = [i for i, ln in enumerate(text.splitlines(), 1) if '"question": 3' in ln][0] - 2 if name == "pretty.json" else 1
        assert r["line"] == start
        assert got["Question 1?"]["source"][0]["index"] == 1


def test_json_lines_in_a_json_file_and_a_bom(tmp_path):
    (tmp_path / "a.png").write_bytes(img_bytes((9, 9, 9)))
    # SeVa's step-1 file is JSON lines under a .json name; Windows tools write a BOM.
    lines = "\n".join(json.dumps(pairwise(i, "a.png")) for i in range(3)) + "\n"
    (tmp_path / "step1.json").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    m = build([tmp_path / "step1.json"], tmp_path / "out", val_fraction=0)
    assert m["counts"]["groups"] == 3 and m["counts"]["records_rejected"] == 0
    assert m["files"][0]["container"] == "jsonl"
    # A BOM before a JSON array too.
    (tmp_path / "arr.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([pairwise(7, "a.png")], indent=1).encode())
    assert build([tmp_path / "arr.json"], tmp_path / "out2", val_fraction=0)["counts"]["groups"] == 1


def rlaif_table(rows: list[dict]) -> pa.Table:
    """RLAIF-V's published columns, `image` as the `datasets` Image() struct, with HF metadata."""
    schema = pa.schema([
        ("ds_name", pa.string()), ("image", IMAGE_TYPE), ("question", pa.string()), ("chosen", pa.string()),
        ("rejected", pa.string()), ("origin_dataset", pa.string()), ("origin_split", pa.string()),
        ("idx", pa.string()), ("image_path", pa.string()),
    ])
    features = {"ds_name": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                **{k: {"dtype": "string", "_type": "Value"} for k in
                   ("question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path")}}
    schema = schema.with_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    return pa.Table.from_pylist(rows, schema=schema)


def rlaif_row(i: int, image: dict) -> dict:
    return {"ds_name": "RLAIF-V", "image": image, "question": f"What is in picture {i}?", "chosen": f"A red thing {i}.",
            "rejected": f"A blue thing {i}.", "origin_dataset": "COCO", "origin_split": "train", "idx": str(i),
            "image_path": f"coco/{i}.jpg"}


def test_parquet_in_the_datasets_layout_row_group_positions(tmp_path):
    imgs = [img_bytes((i * 40, 100, 0), "JPEG" if i % 2 else "PNG") for i in range(5)]
    (tmp_path / "only_path.png").write_bytes(imgs[4])
    rows = [rlaif_row(i, {"bytes": imgs[i], "path": f"{i}.jpg"}) for i in range(4)]  # paths lie about the type
    rows.append(rlaif_row(4, {"bytes": None, "path": "only_path.png"}))  # bytes not embedded: the path is read
    rows.append(rlaif_row(5, {"bytes": b"not an image at all", "path": "5.jpg"}))
    pq.write_table(rlaif_table(rows), tmp_path / "train.parquet", row_group_size=2)
    m = build([tmp_path / "train.parquet"], tmp_path / "out", val_fraction=0)
    got = read_back(tmp_path / "out")
    assert len(got) == 5 and m["files"][0]["container"] == "parquet"
    for i in range(5):
        g = got[f"What is in picture {i}?"]
        assert (g["chosen"], g["rejected"]) == (f"A red thing {i}.", f"A blue thing {i}.")
        assert g["images"] == [imgs[i]]  # the embedded bytes as they are
        assert g["members"] == ["0.jpg" if i % 2 else "0.png"]  # extension from the magic, not the path
    assert got["What is in picture 3?"]["source"] == [{"file": str(tmp_path / "train.parquet"), "line": 4, "row_group": 1, "row": 1}]
    (r,) = rejects(tmp_path / "out")
    assert (r["line"], r["row_group"], r["row"], r["field"]) == (6, 2, 1, "image")
    assert "not a recognised image format" in r["reason"]


def test_hugging_face_dataset_folder_with_image_lists(tmp_path):
    hf = tmp_path / "RLAIF-V-Dataset"
    imgs = [img_bytes((i * 30, 0, 90)) for i in range(6)]
    for shard in range(2):
        rows = [rlaif_row(shard * 3 + i, {"bytes": imgs[shard * 3 + i], "path": None}) for i in range(3)]
        (hf / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(rlaif_table(rows), hf / "data" / f"train-0000{shard}-of-00002.parquet")
    (hf / "README.md").write_text("---\nconfigs:\n- config_name: default\n---\n# RLAIF-V\n")
    (hf / ".cache" / "huggingface").mkdir(parents=True)
    (hf / ".cache" / "huggingface" / "x.json").write_text("not read")
    # A second config with TRL-style `images`: a list of Image() structs, one row with two images.
    multi = pa.table({
        "images": pa.array([[{"bytes": imgs[0], "path": None}, {"bytes": imgs[5], "path": None}]], pa.list_(IMAGE_TYPE)),
        "question": ["<image><image>Which one is darker?"], "chosen": ["The first."], "rejected": ["The second."],
    })
    (hf / "multi").mkdir()
    pq.write_table(multi, hf / "multi" / "train-00000-of-00001.parquet")
    m = build([hf], tmp_path / "out", val_fraction=0)
    assert [Path(f["file"]).relative_to(hf).as_posix() for f in m["files"]] == [
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "multi/train-00000-of-00001.parquet"]
    assert [f["records_used"] for f in m["files"]] == [3, 3, 1]
    got = read_back(tmp_path / "out")
    assert got["What is in picture 5?"]["images"] == [imgs[5]]
    two = got["Which one is darker?"]
    assert two["members"] == ["0.png", "1.png"] and two["images"] == [imgs[0], imgs[5]]
    assert inspect(tmp_path / "out")["ok"]


def test_mmpr_meta_json_reads_every_source_under_its_root(tmp_path):
    mmpr = tmp_path / "MMPR"
    a, b = img_bytes((255, 0, 0)), img_bytes((0, 255, 0))
    for name, data in (("A", a), ("B", b)):
        (mmpr / "images" / name).mkdir(parents=True)
        (mmpr / "images" / name / "1.png").write_bytes(data)  # the same relative name under two roots
    write_jsonl(mmpr / "annotations" / "a.jsonl", [{"image": "1.png", "question": "Colour A?", "chosen": "Red.", "rejected": "Green."}])
    write_jsonl(mmpr / "annotations" / "b.jsonl", [{"image": "1.png", "question": "Colour B?", "chosen": "Green.", "rejected": "Red."},
                                                  {"question": "Text only?", "chosen": "Yes.", "rejected": "No."}])
    meta = {"a": {"root": "MMPR/images/A", "annotation": "MMPR/annotations/a.jsonl", "data_augment": False, "repeat_time": 1, "length": 1},
            "b": {"root": "MMPR/images/B", "annotation": "MMPR/annotations/b.jsonl", "data_augment": False, "repeat_time": 1, "length": 2}}
    (mmpr / "meta.json").write_text(json.dumps(meta, indent=4))
    # The meta file itself, or the folder (whose annotation files are then not read twice).
    for i, inp in enumerate([mmpr / "meta.json", mmpr]):
        m = build([inp], tmp_path / f"out{i}", val_fraction=0)
        assert m["counts"]["records_in"] == 3 and m["counts"]["groups"] == 3
        got = read_back(tmp_path / f"out{i}")
        assert got["Colour A?"]["images"] == [a] and got["Colour B?"]["images"] == [b]
        assert got["Text only?"]["images"] == [] and got["Text only?"]["chosen"] == "Yes."


def test_directories_are_walked_recursively_in_sorted_order(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(img_bytes((1, 2, 3)))
    write_jsonl(tmp_path / "d" / "z.jsonl", [pairwise(0, "../imgs/a.png")])
    write_jsonl(tmp_path / "d" / "sub" / "a.jsonl", [pairwise(1, "../../imgs/a.png")])
    (tmp_path / "d" / "sub" / "b.json").write_text(json.dumps([pairwise(2, "../../imgs/a.png")]))
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    m = build([tmp_path / "d"], tmp_path / "out", val_fraction=0)
    assert [Path(f["file"]).relative_to(tmp_path / "d").as_posix() for f in m["files"]] == ["sub/a.jsonl", "sub/b.json", "z.jsonl"]
    assert m["counts"]["groups"] == 3


def vpa_shard(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("vpa-shard") or str(Path(sys.executable).parent / "vpa-shard")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_exit_codes_of_the_console_script(tmp_path):
    (tmp_path / "a.png").write_bytes(img_bytes((5, 5, 5)))
    write_jsonl(tmp_path / "good.jsonl", [pairwise(0, "a.png"), pairwise(1, "a.png")])
    write_jsonl(tmp_path / "bad.jsonl", [pairwise(2, "missing.png"), {"question": "no answers"}])
    # An image given as an input is no supported container: non-zero, the file and what was expected named.
    p = vpa_shard("build", str(tmp_path / "a.png"), "--out", str(tmp_path / "o1"), "--no-plots")
    assert p.returncode == 1 and "a.png" in p.stderr and "expected JSON lines or a JSON array" in p.stderr, p.stderr
    # A build that uses no record: non-zero, with the per-file counts.
    p = vpa_shard("build", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2"), "--no-plots")
    assert p.returncode == 1 and "used no record" in p.stderr and "bad.jsonl" in p.stderr, p.stderr
    assert "2 records in, 0 used, 0 deduplicated, 2 rejected" in p.stderr
    assert len(rejects(tmp_path / "o2")) == 2
    # A mixed build succeeds and reports each file.
    p = vpa_shard("build", str(tmp_path / "good.jsonl"), str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o3"), "--no-plots", "--val-fraction", "0")
    assert p.returncode == 0, p.stderr
    assert "per file" in p.stdout and "good.jsonl" in p.stdout and "bad.jsonl" in p.stdout
    files = {Path(f["file"]).name: f for f in json.loads((tmp_path / "o3" / "manifest.json").read_text())["files"]}
    assert (files["good.jsonl"]["records_used"], files["bad.jsonl"]["records_rejected"]) == (2, 2)
    # Every record over --max-record-bytes: rejected unread, so nothing is used.
    p = vpa_shard("build", str(tmp_path / "good.jsonl"), "--out", str(tmp_path / "o6"), "--no-plots", "--max-record-bytes", "20")
    assert p.returncode == 1 and all("--max-record-bytes" in r["reason"] for r in rejects(tmp_path / "o6"))
    # A missing input, a broken Parquet file.
    p = vpa_shard("build", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o4"))
    assert p.returncode == 1 and "nope.parquet" in p.stderr
    (tmp_path / "cut.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    p = vpa_shard("build", str(tmp_path / "cut.parquet"), "--out", str(tmp_path / "o5"))
    assert p.returncode == 1 and "cut.parquet" in p.stderr and "Parquet" in p.stderr and "Traceback" not in p.stderr


def test_unsupported_container_raises_input_file_error(tmp_path):
    (tmp_path / "x.csv").write_text("image,question\n")
    with pytest.raises(InputFileError, match="x.csv.*expected JSON lines"):
        build([tmp_path / "x.csv"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="no \\*.jsonl"):
        build([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(EmptyBuildError):
        build([tmp_path / "e.jsonl"], tmp_path / "out")


# Peak RSS from VmHWM (ru_maxrss is inherited across exec, so it would show the parent's peak).
MEMORY_SCRIPT = r"""
import json, sys
from vpa_lightning import rust_pairs
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
base = hwm()
m = json.loads(rust_pairs.build(sys.argv[1]))
print(json.dumps({"base_kb": base, "peak_kb": hwm(), "counts": m["counts"]}))
"""


@pytest.mark.parametrize("container", ["jsonl", "json-array"])
def test_a_huge_record_costs_no_memory(tmp_path, container):
    """Issue 13: a 200 MB line cost 562 MB during format detection. A record over
    --max-record-bytes is now skipped unread (reported), in detection too, and a JSON array is
    streamed, so peak memory stays far below the file size."""
    (tmp_path / "a.png").write_bytes(img_bytes((3, 3, 3)))
    huge = json.dumps({"image": "a.png", "question": "big", "chosen": "x" * (96 << 20), "rejected": "y"})
    small = [json.dumps(pairwise(i, "a.png")) for i in range(3)]
    path = tmp_path / "in.json"
    with open(path, "w") as f:  # the huge record first: detection must not parse it
        if container == "jsonl":
            f.write("\n".join([huge, *small]) + "\n")
        else:
            f.write("[" + ",\n".join([huge, *small]) + "]")
    opts = {"inputs": [str(path)], "out": str(tmp_path / "out"), "val_fraction": 0, "max_record_bytes": 8 << 20, "threads": 2}
    p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(opts)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["counts"]["records_used"] == 3 and res["counts"]["records_rejected"] == 1
    grown_mb = (res["peak_kb"] - res["base_kb"]) / 1024
    assert grown_mb < 64, f"peak grew by {grown_mb:.0f} MB reading a {os.path.getsize(path) >> 20} MB file"
    (r,) = rejects(tmp_path / "out")
    assert r["line"] == 1 and "over the limit" in r["reason"]
