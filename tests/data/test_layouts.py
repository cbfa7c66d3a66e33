"""Published layouts, each in its exact published form, built through ``vpa-shard build`` and read
back with the stock ``webdataset`` reader: exact (chosen, rejected) texts and image bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_image, rejects, write_jsonl

wds = pytest.importorskip("webdataset")


def vpa_shard(*args: str) -> subprocess.CompletedProcess:
    """The console script (``vpa-shard``) as a user runs it."""
    return subprocess.run([sys.executable, "-m", "vpa_lightning.data.cli", *args], capture_output=True, text=True)


def build_and_read(out: Path, *args: str) -> list[dict]:
    """Build, then read every sample with the stock WebDataset reader: one dict per sample with
    its JSON, its images' bytes in order, and its pairs as (chosen text, rejected text)."""
    proc = vpa_shard("build", *map(str, args), "--out", str(out), "--val-fraction", "0", "--no-plots", "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    out_samples = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        js = json.loads(s["json"])
        texts = [r["text"] for r in js["responses"]]
        out_samples.append({
            "json": js,
            "images": [s[i["member"]] for i in js["images"]],
            "pairs": [(texts[p["chosen"]], texts[p["rejected"]]) for p in js["pairs"]],
        })
    return out_samples


def write_json(path: Path, rows: list) -> Path:
    """A JSON array, as ``json.dump(rows, f)`` writes it (SeVa, MM-DPO, POVID, LLaVA-RLHF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def one(samples: list[dict]) -> dict:
    assert len(samples) == 1, samples
    return samples[0]


def test_trl_vision_rows(tmp_path):
    """TRL's vision preference format (HuggingFaceH4/rlaif-v_formatted): ``images`` + messages."""
    img = make_image(tmp_path / "i.png")
    rows = [{"images": ["i.png"],
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who wrote this?"}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Jane Austen."}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Charles Dickens."}]}]}]
    s = one(build_and_read(tmp_path / "out", write_jsonl(tmp_path / "train.jsonl", rows)))
    assert s["pairs"] == [("Jane Austen.", "Charles Dickens.")]
    assert s["images"] == [img.read_bytes()]
    assert s["json"]["prompt"] == "Who wrote this?"


def test_rlaif_v_and_rlhf_v_rows(tmp_path):
    """RLAIF-V / SPA-VL columns (``question``/``chosen``/``rejected``) and RLHF-V's ``text`` JSON string.
    (Their hub files are Parquet; here the same fields as JSON rows.)"""
    a = make_image(tmp_path / "a.jpg", fmt="JPEG")
    make_image(tmp_path / "b.jpg", colour=(1, 200, 1), fmt="JPEG")
    rows = [
        {"ds_name": "RLAIF-V", "image": "a.jpg", "question": "What is in the image?", "chosen": "A red block.",
         "rejected": "A red block and a ball.", "origin_dataset": "VQAv2", "origin_split": "train", "idx": 0, "image_path": "a.jpg"},
    ]
    s = one(build_and_read(tmp_path / "o1", write_jsonl(tmp_path / "rlaif.jsonl", rows)))
    assert s["pairs"] == [("A red block.", "A red block and a ball.")]
    assert s["images"] == [a.read_bytes()]
    rhv = [{"ds_name": "RLHF-V", "image": "b.jpg",
            "text": json.dumps({"question": "Describe it.", "chosen": "A green square.", "rejected": "A green circle."}),
            "origin_dataset": "coco", "origin_split": "train", "idx": 3, "image_path": "b.jpg"}]
    s = one(build_and_read(tmp_path / "o2", write_jsonl(tmp_path / "rlhfv.jsonl", rhv)))
    assert s["pairs"] == [("A green square.", "A green circle.")]


def test_vlfeedback_raw_rows_find_merged_images(tmp_path):
    """VLFeedback as released: no ``img_path``; the image is ``merged_images/{id}.jpg``."""
    img = make_image(tmp_path / "merged_images" / "svit-conversation-3700.jpg", fmt="JPEG")
    ann = lambda r: {a: {"Rating": str(r), "Rationale": "."} for a in ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")}  # noqa: E731
    rows = [{"id": "svit-conversation-3700", "prompt": "What are the colors of the bus?", "models": ["a", "b"],
             "completions": [{"model": "a", "response": "Red and white.", "annotations": ann(5)},
                             {"model": "b", "response": "Blue.", "annotations": ann(2)}]}]
    s = one(build_and_read(tmp_path / "out", write_jsonl(tmp_path / "vlfeedback_80k.jsonl", rows)))
    assert s["pairs"] == [("Red and white.", "Blue.")]
    assert s["images"] == [img.read_bytes()]


def test_declared_fields_and_image_template(tmp_path):
    """Any other layout: ``--field`` (dotted paths) and ``--image-template``."""
    img = make_image(tmp_path / "pics" / "q-17.png")
    rows = [{"meta": {"uid": 17}, "ask": {"text": "<image>\nHow many?"}, "answers": {"good": "Three.", "bad": "Five."}}]
    f = write_jsonl(tmp_path / "custom.jsonl", rows)
    s = one(build_and_read(tmp_path / "out", f, "--field", "prompt=ask.text", "--field", "chosen=answers.good",
                           "--field", "rejected=answers.bad", "--image-template", "pics/q-{meta.uid}.png"))
    assert s["pairs"] == [("Three.", "Five.")]
    assert s["images"] == [img.read_bytes()]
    assert s["json"]["prompt"] == "How many?"
    proc = vpa_shard("build", str(f), "--out", str(tmp_path / "bad"), "--field", "prompt=ask.text", "--field", "chosen=answers.good")
    assert proc.returncode == 2 and "--field rejected=PATH is required" in proc.stderr


def test_text_only_and_multi_image_rows(tmp_path):
    """UltraFeedback-style text rows (no image) and rows with several images are valid samples."""
    a = make_image(tmp_path / "a.png")
    b = make_image(tmp_path / "b.png", colour=(0, 0, 255))
    rows = [{"prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof.", "rejected": "Rain."},
            {"images": ["a.png", "b.png"], "question": "<image><image>\nWhich is bluer?", "chosen": "The second.", "rejected": "The first."}]
    samples = build_and_read(tmp_path / "out", write_jsonl(tmp_path / "mixed.jsonl", rows))
    by_prompt = {s["json"]["prompt"]: s for s in samples}
    assert by_prompt["Write a haiku about rain."]["images"] == []
    assert by_prompt["Write a haiku about rain."]["pairs"] == [("Soft rain on the roof.", "Rain.")]
    assert by_prompt["Which is bluer?"]["images"] == [a.read_bytes(), b.read_bytes()]


def test_forced_format_and_detection(tmp_path):
    make_image(tmp_path / "a.jpg", fmt="JPEG")
    q = {"from": "human", "value": "<image>\nQ"}
    rows = [{"image": "a.jpg", "conversations": [q, {"from": "gpt", "value": "yes"}],
             "rejected_conversations": [q, {"from": "gpt", "value": "no"}]}]
    f = write_jsonl(tmp_path / "povid.jsonl", rows)
    assert one(build_and_read(tmp_path / "o1", f, "--format", "povid"))["pairs"] == [("yes", "no")]
    # Forced to another layout: the record is rejected with the field it lacks named.
    vpa_shard("build", str(f), "--out", str(tmp_path / "o2"), "--format", "llava-rlhf", "--no-plots")
    assert rejects(tmp_path / "o2")[0]["field"] == "output_1"
