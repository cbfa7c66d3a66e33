"""SeVa pair generation end to end on the tiny LLaVA (no download)."""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from vpa_lightning.augment.pixels import corrupt_pixel_values
from vpa_lightning.models.generation import encode_for_generation
from vpa_lightning.seva.cli import generate_main as main
from vpa_lightning.seva.generate import generate_pairs, read_prompts

N_IMAGES = 6


@pytest.fixture(scope="module")
def tiny_llava():
    from vpa_lightning.models import build_tiny_vlm

    return build_tiny_vlm("llava", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("seva_images")
    for i in range(N_IMAGES):
        im = Image.new(
            "RGB", (40 + 4 * i, 32 + 2 * i), (40 * i, 255 - 30 * i, (90 * i) % 256)
        )
        im.putpixel((i, i), (255, 255, 255))
        im.save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def _jsonl_prompts(path: Path) -> Path:
    rows = [
        {"image": f"img{i}.png", "question": f"What colour is picture {i}?"}
        for i in range(N_IMAGES)
    ]
    rows.append({"image": "missing.png", "question": "Where is this?"})  # line 7
    rows.append({"image": "broken.png", "question": "What is broken?"})  # line 8
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n"
    )  # line 9
    return path


def _llava_prompts(path: Path) -> Path:
    entries = [
        {
            "id": f"s{i}",
            "image": f"img{i}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\nDescribe picture {i} briefly."},
                {"from": "gpt", "value": "An answer that SeVa ignores."},
            ],
        }
        for i in range(N_IMAGES)
    ]
    entries.append(
        {
            "id": "gone",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nHi?"}],
        }
    )
    entries.append(
        {
            "id": "textonly",
            "conversations": [{"from": "human", "value": "No image here"}],
        }
    )
    path.write_text(json.dumps(entries))
    return path


def _shard_members(directory: Path) -> tuple[list[dict], list[bytes]]:
    samples, pngs = [], []
    for tar in sorted(directory.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                if m.name.endswith(".json"):
                    samples.append(json.loads(data))
                elif m.name.endswith(".png"):
                    pngs.append(data)
    return samples, pngs


def _balanced(c: dict) -> bool:
    return (
        c["prompts_in"]
        == c["rejected"]
        + c["rejected_by_build"]
        + c["identical_dropped"]
        + c["pairs_written"]
    )


def test_read_prompts_detects_both_formats(tmp_path):
    prompts, rejects = read_prompts(_jsonl_prompts(tmp_path / "p.jsonl"))
    assert len(prompts) == N_IMAGES + 2 and prompts[0]["source"] == "line 1"
    assert [r["source"] for r in rejects] == ["line 9"] and "invalid JSON" in rejects[
        0
    ]["reason"]
    prompts, rejects = read_prompts(_llava_prompts(tmp_path / "p.json"))
    assert (
        prompts[0]["question"] == "Describe picture 0 briefly."
    )  # <image> token stripped
    assert prompts[0]["source"] == "id s0" and len(prompts) == N_IMAGES + 1
    assert rejects == [{"source": "id textonly", "reason": "no image"}]
    # a JSON list with a .jsonl-less, unknown extension is detected by content
    other = tmp_path / "p.txt"
    other.write_text((tmp_path / "p.json").read_text())
    assert len(read_prompts(other)[0]) == N_IMAGES + 1


def test_augmentation_changes_only_pixel_values(tiny_llava, images):
    from PIL import Image

    _, processor = tiny_llava
    ims = [Image.open(images / f"img{i}.png").convert("RGB") for i in range(3)]
    inputs = encode_for_generation(
        processor, ims, ["q one?", "a longer question two?", "three?"]
    )
    assert (
        processor.tokenizer.padding_side == "right"
    )  # restored after left-padded encoding
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding for generation
    noisy = corrupt_pixel_values(inputs, processor, "diffusion_noise", seed=0)
    assert noisy["pixel_values"].shape == inputs["pixel_values"].shape
    assert (noisy["pixel_values"] - inputs["pixel_values"]).abs().mean() > 0.1
    assert torch.equal(noisy["input_ids"], inputs["input_ids"])
    assert torch.equal(
        corrupt_pixel_values(inputs, processor, "diffusion_noise", seed=0)["pixel_values"],
        noisy["pixel_values"],
    )
    assert torch.equal(
        corrupt_pixel_values(inputs, processor, "none", seed=0)["pixel_values"],
        inputs["pixel_values"],
    )


def test_jsonl_end_to_end_shards_and_counts(tiny_llava, images, tmp_path):
    from vpa_lightning.data.datamodule import PreferenceDataModule

    out = tmp_path / "out"
    counts = generate_pairs(
        tiny_llava,
        _jsonl_prompts(tmp_path / "p.jsonl"),
        images,
        out,
        max_new_tokens=6,
        batch_size=4,
    )
    assert counts["prompts_in"] == N_IMAGES + 3
    assert counts["rejected"] == 3 and counts["generated"] == N_IMAGES
    reasons = {r["source"]: r["reason"] for r in counts["rejected_reasons"]}
    assert set(reasons) == {"line 7", "line 8", "line 9"}
    assert "missing.png" in reasons["line 7"] and "invalid JSON" in reasons["line 9"]
    assert _balanced(counts) and counts["pairs_written"] > 0
    assert (
        json.loads((out / "seva-rank0.json").read_text())["pairs_written"]
        == counts["pairs_written"]
    )

    rows = [
        json.loads(line)
        for line in (out / "pairs-rank0.jsonl").read_text().splitlines()
    ]
    assert (
        len(rows) == N_IMAGES
        and sum(r["chosen"] != r["rejected"] for r in rows) == counts["pairs_written"]
    )

    manifest = json.loads((out / "rank0" / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == counts["pairs_written"]
    samples, pngs = _shard_members(out / "rank0")
    assert len(samples) == counts["pairs_written"]
    # the shard image is the ORIGINAL image file; chosen = answer on it, rejected = augmented answer
    originals = {(images / f"img{i}.png").read_bytes() for i in range(N_IMAGES)}
    assert set(pngs) <= originals
    by_question = {r["question"]: r for r in rows}
    for s in samples:
        (pair,) = s["pairs"]
        row = by_question[s["prompt"]]
        assert s["responses"][pair["chosen"]]["text"] == row["chosen"]
        assert s["responses"][pair["rejected"]]["text"] == row["rejected"]

    dm = PreferenceDataModule(str(out / "rank0"), batch_size=2, processor=tiny_llava[1])
    got_pairs = got_groups = 0
    for batch in dm.train_dataloader():
        got_pairs += batch["chosen"].numel()
        got_groups += len(batch["keys"])
    assert got_groups == got_pairs == counts["pairs_written"]


def test_llava_json_identity_augmentation_drops_all_pairs(tiny_llava, images, tmp_path):
    out = tmp_path / "out"
    counts = generate_pairs(
        tiny_llava,
        _llava_prompts(tmp_path / "llava.json"),
        images,
        out,
        augmentation="none",
        max_new_tokens=4,
    )
    assert counts["prompts_in"] == N_IMAGES + 2 and counts["rejected"] == 2
    assert {r["source"] for r in counts["rejected_reasons"]} == {
        "id gone",
        "id textonly",
    }
    assert counts["generated"] == N_IMAGES
    assert counts["identical_dropped"] == N_IMAGES and counts["pairs_written"] == 0
    assert counts["rejected_by_build"] == 0 and _balanced(counts)
    assert _shard_members(out / "rank0")[0] == []


def test_cli_and_two_ranks_merge(tiny_llava, images, tmp_path):
    from vpa_lightning.data import merge
    from vpa_lightning.models import build_tiny_vlm

    prompts = _jsonl_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def rank1():
        try:
            results[1] = generate_pairs(
                build_tiny_vlm("llava", seed=0),
                prompts,
                images,
                out,
                max_new_tokens=6,
                rank=1,
                world_size=2,
                barrier_timeout=120,
            )
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    t = threading.Thread(target=rank1)
    t.start()
    args = [
        f"--prompts_file={prompts}",
        f"--image_root={images}",
        f"--out_dir={out}",
        "--model=tiny:llava",
    ]
    results[0] = main(args + ["--max_new_tokens=6", "--rank=0", "--world_size=2"])
    t.join(timeout=180)
    assert not errors and set(results) == {0, 1}
    assert sum(r["prompts_in"] for r in results.values()) == N_IMAGES + 3
    assert sum(r["generated"] for r in results.values()) == N_IMAGES
    assert (out / "rank0" / "manifest-p0000of0002.json").exists()
    assert (out / "rank1" / "manifest-p0001of0002.json").exists()
    merged = merge([out / "rank0", out / "rank1"], out)
    c = merged["counts"]
    assert c["records_in"] == N_IMAGES
    assert c["pairs"] == sum(r["pairs_written"] for r in results.values())
    assert (
        sum(r["rejected"] for r in results.values())
        + c["records_rejected"]
        + c["pairs"]
        == N_IMAGES + 3
    )
    assert (
        json.loads((out / "manifest.json").read_text())["counts"]["pairs"] == c["pairs"]
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_other_families_generate_pairs_the_trainer_reads(family, images, tmp_path):
    """Qwen2-VL (flattened patches + image_grid_thw) and Idefics3 (crops) go through the same path."""
    from vpa_lightning.data.datamodule import PreferenceDataModule
    from vpa_lightning.models import build_tiny_vlm

    model, processor = build_tiny_vlm(family, seed=0)
    out = tmp_path / "out"
    counts = generate_pairs(
        (model, processor), _jsonl_prompts(tmp_path / "p.jsonl"), images, out, max_new_tokens=6, batch_size=4
    )
    assert counts["generated"] == N_IMAGES and counts["rejected"] == 3 and _balanced(counts)
    assert counts["pairs_written"] > 0
    dm = PreferenceDataModule(str(out / "rank0"), batch_size=2, processor=processor)
    assert sum(len(b["keys"]) for b in dm.train_dataloader()) == counts["pairs_written"]
