"""PreferenceDataModule: reading vpa-shard shards, batch layout, skipping corrupt samples."""

from __future__ import annotations

import io
import logging
import shutil

import pytest
import torch
from PIL import Image

from vpa_lightning import PreferenceDataModule
from vpa_lightning.data.datamodule import resolve_shards
from vpa_lightning.models import GroupBatch

from .conftest import read_tar, write_tar


def _read_all(dm: PreferenceDataModule, loader) -> dict:
    keys, pairs, groups, rows = [], 0, 0, 0
    for batch in loader:
        inputs: GroupBatch = batch["inputs"]
        n = inputs.labels.shape[0]
        assert batch["chosen"].shape == batch["rejected"].shape == batch["pair_group"].shape
        assert (batch["chosen"] != batch["rejected"]).all()
        assert batch["chosen"].max() < n and batch["rejected"].max() < n
        # chosen/rejected rows belong to the pair's group
        assert (inputs.group_index[batch["chosen"]] == batch["pair_group"]).all()
        assert (inputs.group_index[batch["rejected"]] == batch["pair_group"]).all()
        assert batch["response_index"].shape == (n,) and len(batch["response_sha"]) == n
        keys += batch["keys"]
        pairs += batch["chosen"].numel()
        groups += len(batch["keys"])
        rows += n
    return {"keys": keys, "pairs": pairs, "groups": groups, "rows": rows}


def test_counts_match_manifest(demo_shards, manifest, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(str(demo_shards), batch_size=3, processor=processor, shuffle_buffer=8)
    train_shards = [s for s in manifest["shards"] if s["split"] == "train"]
    assert len(train_shards) >= 2 and len(dm.train_urls) == len(train_shards)
    assert dm.num_train_groups == manifest["counts"]["groups_train"]
    got = _read_all(dm, dm.train_dataloader())
    assert got["groups"] == len(set(got["keys"])) == manifest["counts"]["groups_train"]
    assert got["pairs"] == manifest["counts"]["pairs_train"]
    assert got["rows"] == sum(s["responses"] for s in train_shards)
    val = _read_all(dm, dm.val_dataloader())
    assert val["groups"] == manifest["counts"]["groups_val"] and val["pairs"] == manifest["counts"]["pairs_val"]
    assert dm.skipped == {}


def test_batch_content_and_val_order_is_deterministic(demo_shards, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(str(demo_shards), batch_size=2, processor=processor)
    first = next(iter(dm.val_dataloader()))
    again = next(iter(dm.val_dataloader()))
    assert first["keys"] == again["keys"]
    inputs = first["inputs"]
    assert set(inputs.model_inputs) >= {"input_ids", "attention_mask", "pixel_values"}
    assert inputs.model_inputs["pixel_values"].shape[0] == inputs.labels.shape[0]
    assert torch.isfinite(first["probability"]).all() and (first["probability"] > 0.5).all()


def test_train_shuffle_changes_with_seed(demo_shards, tiny_llava):
    _, processor = tiny_llava
    orders = []
    for seed in (0, 0, 1):
        dm = PreferenceDataModule(str(demo_shards), batch_size=4, processor=processor, seed=seed, shuffle_buffer=16)
        orders.append([k for b in dm.train_dataloader() for k in b["keys"]])
    assert orders[0] == orders[1] and orders[0] != orders[2] and sorted(orders[0]) == sorted(orders[2])


def test_brace_urls_and_workers(demo_shards, manifest, tiny_llava):
    _, processor = tiny_llava
    train = sorted(s["path"] for s in manifest["shards"] if s["split"] == "train")
    assert train[0] == "train-000000.tar"
    spec = f"{demo_shards}/train-{{000000..{len(train) - 1:06d}}}.tar"
    urls, val, counts = resolve_shards(spec)
    assert urls == spec and val is None and counts == {}
    dm = PreferenceDataModule(spec, batch_size=4, processor=processor, num_workers=2)
    got = _read_all(dm, dm.train_dataloader())
    assert got["groups"] == len(set(got["keys"])) == manifest["counts"]["groups_train"]  # each shard read once
    assert dm.val_dataloader() == []


def _corrupt_copy(demo_shards, tmp_path):
    """Copy train-000000.tar with 3 samples broken by hand: garbage image, truncated PNG, malformed JSON."""
    members = read_tar(demo_shards / "train-000000.tar")
    keys = sorted({name.split(".", 1)[0] for name, _ in members})
    bad = keys[:3]
    out = []
    for name, data in members:
        key, ext = name.split(".", 1)
        if key == bad[0] and ext == "0.png":
            data = b"this is not an image"
        elif key == bad[1] and ext == "0.png":
            data = data[: len(data) // 2]
        elif key == bad[2] and ext == "json":
            data = data[:-10]
        out.append((name, data))
    path = write_tar(tmp_path / "corrupt.tar", out)
    return path, len(keys), bad


def test_corrupt_samples_are_skipped_and_counted(demo_shards, tiny_llava, tmp_path, caplog):
    _, processor = tiny_llava
    path, n, bad = _corrupt_copy(demo_shards, tmp_path)
    # the truncated PNG must really be undecodable
    with pytest.raises(OSError):
        Image.open(io.BytesIO(dict(read_tar(path))[f"{bad[1]}.0.png"])).load()
    dm = PreferenceDataModule(str(path), batch_size=4, processor=processor, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="vpa_lightning.data.datamodule"):
        batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == n - 3 and not set(bad) & set(keys)
    assert dm.skipped == {"malformed_sample": 3}
    for key in bad:
        assert any(key in r.getMessage() for r in caplog.records), key
    reported = [k for b in batches for k in b["skipped"]]
    assert len(reported) == 3 and all(any(key in r for r in reported) for key in bad)


def test_truncated_shard_does_not_crash(demo_shards, tiny_llava, tmp_path, caplog):
    _, processor = tiny_llava
    data = (demo_shards / "train-000000.tar").read_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: len(data) // 2 + 100])
    other = tmp_path / "ok.tar"
    shutil.copy(demo_shards / "train-000001.tar", other)
    dm = PreferenceDataModule(f"{path}::{other}", batch_size=4, processor=processor, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="vpa_lightning.data.datamodule"):
        keys = [k for b in dm.train_dataloader() for k in b["keys"]]
    n_ok = len({name.split(".", 1)[0] for name, _ in read_tar(other)})
    assert len(keys) > n_ok  # the readable part of the cut shard plus the whole other shard
    assert sum(dm.skipped.values()) >= 1 and caplog.records


def test_prompt_longer_than_max_length_skips_group(demo_shards, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(str(demo_shards), batch_size=4, processor=processor, max_length=8)
    batch = next(iter(dm.val_dataloader()))
    assert batch["inputs"] is None and batch["keys"] == [] and len(batch["skipped"]) == 4
    assert dm.skipped["tokenisation"] == 4


def test_processor_required(demo_shards):
    dm = PreferenceDataModule(str(demo_shards))
    with pytest.raises(RuntimeError, match="processor"):
        dm.train_dataloader()


def test_directory_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PreferenceDataModule(str(tmp_path))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_groups_per_epoch_resamples_fixed_length(demo_shards, tiny_llava, num_workers):
    _, processor = tiny_llava
    dm = PreferenceDataModule(
        str(demo_shards), batch_size=3, processor=processor, groups_per_epoch=10, num_workers=num_workers
    )
    loader = dm.train_dataloader()
    batches = list(loader)
    # rounded up to a multiple of workers x batch_size: 12 groups with 0-1 worker, 12 with 2 workers
    assert len(batches) == len(loader) == 4
    assert sum(len(b["keys"]) for b in batches) == 12
    assert dm.num_train_groups == 10


def test_test_shards_directory_gives_all_shards(demo_shards, manifest, tiny_llava):
    dm = PreferenceDataModule(str(demo_shards), test_shards=str(demo_shards), processor=tiny_llava[1])
    assert len(dm.test_urls) == len(manifest["shards"])
    assert sum(len(b["keys"]) for b in dm.test_dataloader()) == manifest["counts"]["groups"]


def test_text_only_and_multi_image_samples_train(tiny_llava, tmp_path, caplog):
    import json

    import webdataset as wds

    from vpa_lightning.data import build, inspect
    from vpa_lightning.data.datamodule import decode_sample

    _, processor = tiny_llava
    for i, colour in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
        Image.new("RGB", (24, 20), colour).save(tmp_path / f"{i}.png")
    rows = [
        {"image": "0.png", "question": "Colour?", "chosen": "Red.", "rejected": "Blue."},
        {"question": "Say hi.", "chosen": "Hi!", "rejected": "No."},  # text-only
        {"images": ["1.png", "2.png"], "question": "<image><image>Which is green?", "chosen": "The first.", "rejected": "The second."},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "shards"
    m = build([tmp_path / "rows.jsonl"], out, val_fraction=0)
    assert m["counts"]["groups"] == 3 and inspect(out)["ok"]
    raw = {s["__key__"]: s for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False, empty_check=False)}
    decoded = [decode_sample(s) for s in raw.values()]
    assert sorted(len(e.images) for e in decoded) == [0, 1, 2]
    multi = next(e for e in decoded if len(e.images) == 2)
    assert [im.getpixel((0, 0)) for im in multi.images] == [(0, 250, 0), (0, 0, 250)]
    assert multi.group.image is None
    dm = PreferenceDataModule(str(out), batch_size=3, processor=processor, shuffle_buffer=0)
    batches = list(dm.train_dataloader())
    assert dm.skipped == {}
    (batch,) = batches  # the three kinds in one batch
    assert batch["keys"] == [e.key for e in decoded]
    inputs = batch["inputs"]
    by_key = {e.key: len(e.images) for e in decoded}
    counts = [by_key[batch["keys"][g]] for g in inputs.group_index.tolist()]
    assert inputs.image_counts.tolist() == counts
    assert inputs.model_inputs["pixel_values"].shape[0] == sum(counts)  # LLaVA: one entry per image
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_row = (inputs.model_inputs["input_ids"] == image_token).sum(1) // 4  # 4 tokens per tiny-llava image
    assert per_row.tolist() == counts


def test_images_train_where_the_prompt_placed_them(tiny_llava, tmp_path):
    """Built shards carry each image's offset; the batch's user turn is the prompt cut there, so a
    row's tokens are the template's for [text, image, text, image, text] (a prompt without a
    placeholder: images first, as before)."""
    import json

    from vpa_lightning.data import build

    _, processor = tiny_llava
    for i, colour in enumerate([(250, 0, 0), (0, 250, 0)]):
        Image.new("RGB", (24, 20), colour).save(tmp_path / f"{i}.png")
    rows = [{"images": ["0.png", "1.png"], "question": "Compare <image> with <image>: which is older?", "chosen": "The first.", "rejected": "The second."},
            {"image": "0.png", "question": "What colour?", "chosen": "Red.", "rejected": "Blue."}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    build([tmp_path / "rows.jsonl"], tmp_path / "shards", val_fraction=0)
    dm = PreferenceDataModule(str(tmp_path / "shards"), batch_size=2, processor=processor, shuffle_buffer=0)
    (batch,) = list(dm.train_dataloader())
    inputs = batch["inputs"]
    for row in range(len(inputs.group_index)):
        ours = inputs.model_inputs["input_ids"][row][inputs.model_inputs["attention_mask"][row].bool()].tolist()
        two = int(inputs.image_counts[row]) == 2
        response = ["The first.", "The second."] if two else ["Red.", "Blue."]
        if two:
            user = [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "}, {"type": "image"},
                    {"type": "text", "text": ": which is older?"}]
        else:
            user = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": response[row % 2]}]}], tokenize=False)
        images = [Image.new("RGB", (24, 20), (250, 0, 0))] * sum(p["type"] == "image" for p in user)
        full = processor(text=[text], images=[images], return_tensors="pt")["input_ids"][0].tolist()
        assert ours == full[: len(ours)], processor.tokenizer.convert_ids_to_tokens(ours)


def test_collator_keeps_the_groups_a_family_can_batch_together():
    """Mllama cannot batch text-only with image groups: the batch keeps the image groups and the
    text-only one is skipped with a counted reason (never a crash)."""
    from vpa_lightning.data.datamodule import GroupCollator, PreferenceExample
    from vpa_lightning.models import PreferenceGroup, build_tiny_vlm

    _, processor = build_tiny_vlm("mllama")
    image = Image.new("RGB", (30, 20), (200, 10, 10))
    groups = [
        PreferenceGroup(image, "Colour?", ["Red.", "Blue."], id="a"),
        PreferenceGroup(None, "Say hi.", ["Hi!", "No."], id="t", images=[]),
        PreferenceGroup(image, "Shape?", ["Round.", "Square."], id="b"),
    ]
    examples = [PreferenceExample(key=g.id, group=g, pairs=[(0, 1)], probability=[1.0], margin=[1.0]) for g in groups]
    collator = GroupCollator(processor)
    batch = collator(examples)
    assert batch["keys"] == ["a", "b"] and batch["chosen"].tolist() == [0, 2]
    assert collator.skips.counts == {"tokenisation": 1} and len(batch["skipped"]) == 1
    assert batch["skipped"][0].startswith("sample 't'") and "cannot share a batch" in batch["skipped"][0]


def test_decode_reads_image_offsets_and_refuses_bad_ones():
    """Per-image ``offset`` becomes ``group.image_offsets``; none at all (format 1, older format 2)
    is ``None`` (images first); offsets outside the prompt, decreasing or not integers are a
    malformed sample; shipped reference log-probs are read per pair."""
    import io
    import json

    from vpa_lightning.data.datamodule import SampleError, decode_sample

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    png = buf.getvalue()

    def sample(offsets, ref=None):
        images = [{"member": f"{i}.png", "sha256": "x", **({} if o is None else {"offset": o})} for i, o in enumerate(offsets)]
        pair = {"chosen": 0, "rejected": 1, **({} if ref is None else {"ref_logps": ref})}
        meta = {"prompt": "Compare  with ?", "images": images, "responses": [{"text": "a"}, {"text": "b"}], "pairs": [pair]}
        return {"__key__": "k", "json": json.dumps(meta).encode(), **{f"{i}.png": png for i in range(len(offsets))}}

    assert decode_sample(sample([8, 14])).group.image_offsets == [8, 14]
    assert decode_sample(sample([None, None])).group.image_offsets is None
    for bad in ([14, 8], [8, 99], [8, 1.5], [8, True], [-1, 3]):
        with pytest.raises(SampleError, match="image offsets"):
            decode_sample(sample(bad))
    e = decode_sample(sample([0, 0], {"chosen": -1.5, "rejected": -4.0, "model": "m", "fields": "ref_win_logp, ref_rej_logp"}))
    assert e.ref_logps == [{"chosen": -1.5, "rejected": -4.0, "model": "m"}]
    with pytest.raises(SampleError, match="ref_logps"):
        decode_sample(sample([0, 0], {"chosen": "x", "rejected": -4.0}))
