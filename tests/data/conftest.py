"""Fixtures for data-core tests: tiny images made with PIL, JSONL writers, shard readers."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

VLF_ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


def make_image(path: Path, colour=(200, 30, 30), size=(16, 12), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def vlf_completion(model: str, text: str, ratings: tuple) -> dict:
    return {
        "model": model,
        "response": text,
        "annotations": {a: {"Rating": r, "Rationale": "because"} for a, r in zip(VLF_ASPECTS, ratings)},
    }


def vlf_row(img: str, prompt: str, completions: list[dict], rid: str = "r") -> dict:
    return {"id": rid, "prompt": prompt, "img_path": img, "models": [c["model"] for c in completions], "completions": completions}


def read_samples(out: Path) -> dict[str, dict]:
    """key -> {"json": dict, "images": [bytes, ...] (in the JSON's order), "exts": [...],
    "image"/"ext": the first image and its extension, "split", "shard"} via tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict] = {}
    for s in manifest["shards"]:
        with tarfile.open(out / s["path"]) as tf:
            members: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, fields in members.items():
            js = json.loads(fields.pop("json"))
            names = [i["member"] for i in js["images"]]
            assert sorted(names) == sorted(fields), (key, names, list(fields))
            entry = samples.setdefault(key, {"split": s["split"], "shard": s["path"], "json": js})
            entry["images"] = [fields[n] for n in names]
            entry["exts"] = [n.split(".", 1)[1] for n in names]
            if names:
                entry["image"], entry["ext"] = entry["images"][0], entry["exts"][0]
    return samples


def rejects(out: Path, name: str = "rejects.jsonl") -> list[dict]:
    text = (out / name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def hand_worked(tmp_path: Path) -> Path:
    """One VLFeedback record with 4 completions whose ratings are worked out by hand in the tests.

    Means: A (4,5,5)=4.667, B (2,3,5)=3.333, C (4,4,5)=4.333, D (2,3,5)=3.333.
    """
    make_image(tmp_path / "img" / "a.png")
    rows = [vlf_row("img/a.png", "<image>\nWhat is shown?", [
        vlf_completion("mA", "A red square on white.", ("4", "5", "5")),
        vlf_completion("mB", "A blue circle.", (2, 3, 5)),
        vlf_completion("mC", "A red square.", ("4", 4, "5")),
        vlf_completion("mD", "A green cat.", ("2", "3", 5)),
    ])]
    return write_jsonl(tmp_path / "vlf.jsonl", rows)


def make_dataset(root: Path, n_images: int = 40, seed: int = 0) -> list[Path]:
    """A mixed set: VLFeedback rows (with exact duplicates across files), rated rows, pairwise rows."""
    import random

    rng = random.Random(seed)
    for i in range(n_images):
        fmt = "JPEG" if i % 2 else "PNG"
        make_image(root / "img" / f"{i:03d}.{fmt.lower()}", colour=(i * 5 % 256, 255 - i * 3 % 256, i * 11 % 256), fmt=fmt)
    name = lambda i: f"img/{i:03d}.{'jpeg' if i % 2 else 'png'}"  # noqa: E731
    vlf, rated, pw = [], [], []
    for i in range(n_images):
        comps = [vlf_completion(f"model-{k}", f"answer {k} to {i}", tuple(rng.randint(1, 5) for _ in range(3))) for k in range(4)]
        vlf.append(vlf_row(name(i), f"Question {i % 7} about the picture?", comps, rid=str(i)))
        rated.append({"prompt": f"Rate question {i}", "image": name(i), "responses": [
            {"text": f"rated {k} {i}", "model": f"model-{k}", "scores": {a: rng.randint(0, 4) for a in
             ("helpfulness", "correctness", "coherence", "complexity", "verbosity")}} for k in range(3)]})
        pw.append({"image": name(i), "question": f"Pairwise {i}?", "chosen": f"right {i}", "rejected": f"wrong {i}"})
    files = [
        write_jsonl(root / "vlf_a.jsonl", vlf[: n_images // 2] + ["{broken"]),
        write_jsonl(root / "vlf_b.jsonl", vlf[n_images // 3:]),  # overlaps vlf_a: duplicates
        write_jsonl(root / "rated.jsonl", rated),
        write_jsonl(root / "pairs.jsonl", pw),
    ]
    return files
