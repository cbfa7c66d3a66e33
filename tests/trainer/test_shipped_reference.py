"""``--model.ref_logps_from_data``: reference log-probs that a dataset ships (MM-DPO's
``ref_win_logp``/``ref_rej_logp``, kept per pair in the shards) replace the reference forward."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from vpa_lightning import PreferenceDataModule, VisionDPOModule
from vpa_lightning.data import build
from vpa_lightning.losses import KTOLoss, MDPOLoss, SimPOLoss

from .test_module import _perturb_lora

QUESTIONS = {"a.jpg": "<image>\nWhat is on the plate?", "b.jpg": "<image>\nWhat colour is it?"}
#: (image, chosen, rejected): the first two share image + question, so they merge into one group of
#: K = 3 responses with two pairs that share their chosen response.
PAIRS = [("a.jpg", "Two slices of pizza.", "A cake."), ("a.jpg", "Two slices of pizza.", "A bowl of soup."),
         ("b.jpg", "Green.", "Red.")]


def _shards(tmp_path: Path, name: str, ref: dict[str, float] | None, model: str | None = "tiny:llava") -> Path:
    """MM-DPO's DPO file (a JSON list) with ``ref_win_logp``/``ref_rej_logp`` from ``ref`` (response
    text -> value; ``None``: no reference fields), built into shards."""
    root = tmp_path / "coco"
    root.mkdir(exist_ok=True)
    for i, img in enumerate(QUESTIONS):
        Image.new("RGB", (24, 20), (200, 40 * i, 10)).save(root / img)
    rows = []
    for img, win, rej in PAIRS:
        row = {"question": {"from": "human", "value": QUESTIONS[img]}, "chosen": {"from": "gpt", "value": win},
               "rejected": {"from": "gpt", "value": rej}, "image": img}
        if ref is not None:
            row |= {"ref_win_logp": ref[win], "ref_rej_logp": ref[rej]}
        rows.append(row)
    (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    out = tmp_path / name
    build([tmp_path / f"{name}.json"], out, image_root=root, val_fraction=0, ref_logp_model=model)
    return out


def _batch(shards: Path, processor) -> dict:
    (batch,) = list(PreferenceDataModule(str(shards), batch_size=3, processor=processor, shuffle_buffer=0).train_dataloader())
    return batch


def _samples(shards: Path) -> dict[str, dict]:
    """Each sample's JSON by key (the one shard, read with the stock reader)."""
    import webdataset as wds

    samples = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(str(shards / "train-000000.tar"), shardshuffle=False, empty_check=False)}
    return samples


def _module(**kwargs) -> VisionDPOModule:
    module = VisionDPOModule("tiny:llava", lora_dropout=0.0, **kwargs)
    _perturb_lora(module)
    return module


def test_shipped_reference_logps_replace_the_reference_forward(tmp_path, tiny_llava, monkeypatch):
    _, processor = tiny_llava
    # what the reference model computes for every response (a build whose shipped values are made up)
    first = _shards(tmp_path, "probe", {t: -1.0 for p in PAIRS for t in p[1:]})
    batch = _batch(first, processor)
    assert sorted(batch["inputs"].group_sizes) == [2, 3]  # a K = 3 group with two pairs, and a pair
    live = _module()
    expected = live.compute_loss(batch)
    reference = live.reference_logps(batch["inputs"]).sum_logps
    samples = _samples(first)
    texts = [samples[batch["keys"][g]]["responses"][int(i)]["text"]
             for g, i in zip(batch["inputs"].group_index.tolist(), batch["response_index"])]
    true_ref = dict(zip(texts, reference.tolist()))

    # shards that ship exactly those values: the same loss, with no reference forward at all (and no cache)
    shipped = _module(ref_logps_from_data=True, reference_cache_dir=str(tmp_path / "cache"))
    assert shipped.reference_cache_dir is None
    monkeypatch.setattr(shipped, "reference_logps", lambda *a, **k: pytest.fail("reference forward with shipped log-probs"))
    same = _batch(_shards(tmp_path, "same", true_ref), processor)
    assert same["keys"] == batch["keys"] and same["chosen"].tolist() == batch["chosen"].tolist()
    out = shipped.compute_loss(same)
    torch.testing.assert_close(out["losses"], expected["losses"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["chosen_rewards"], expected["chosen_rewards"], rtol=1e-4, atol=1e-5)

    # a different shipped value moves exactly its pair's reward: rejected reward = beta * (policy - ref)
    moved = _batch(_shards(tmp_path, "moved", true_ref | {"A bowl of soup.": true_ref["A bowl of soup."] - 2.0}), processor)
    out2 = shipped.compute_loss(moved)
    soup_row = texts.index("A bowl of soup.")
    pair = (moved["rejected"] == soup_row).nonzero().item()
    delta = out2["rejected_rewards"] - expected["rejected_rewards"]
    torch.testing.assert_close(delta[pair], torch.tensor(0.1 * 2.0), rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(delta.abs() > 1e-4) == 1
    assert out2["losses"][pair].item() != pytest.approx(expected["losses"][pair].item(), abs=1e-4)
    torch.testing.assert_close(out2["chosen_rewards"], expected["chosen_rewards"], rtol=1e-4, atol=1e-5)


def test_shipped_reference_logps_must_come_from_the_reference_model(tmp_path, tiny_llava):
    _, processor = tiny_llava
    ref = {t: -3.0 for p in PAIRS for t in p[1:]}
    other = _batch(_shards(tmp_path, "other", ref, model="llava-v1.5-13b"), processor)
    with pytest.raises(ValueError, match=r"--model.ref_logps_from_data: .*model 'llava-v1.5-13b'.*--model.ref_logps_model llava-v1.5-13b"):
        _module(ref_logps_from_data=True).compute_loss(other)
    # the explicit override accepts them (a path whose last component is the name matches too)
    assert torch.isfinite(_module(ref_logps_from_data=True, ref_logps_model="/models/llava-v1.5-13b/").compute_loss(other)["loss"])
    unnamed = _batch(_shards(tmp_path, "unnamed", ref, model=None), processor)
    with pytest.raises(ValueError, match="--ref-logp-model"):
        _module(ref_logps_from_data=True).compute_loss(unnamed)
    # samples that ship none: an error naming the flag and a sample, never a silent reference forward
    bare = _batch(_shards(tmp_path, "bare", None), processor)
    with pytest.raises(ValueError, match=r"--model.ref_logps_from_data: sample '[0-9a-f]+' response \d has no shipped"):
        _module(ref_logps_from_data=True).compute_loss(bare)


def test_shipped_reference_logps_need_no_reference_model():
    # full fine-tuning makes no reference copy
    shipped, full = VisionDPOModule("tiny:llava", lora=False, ref_logps_from_data=True), VisionDPOModule("tiny:llava", lora=False)
    for module in (shipped, full):  # attached to a Trainer, configure_model creates the reference it needs
        module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
        module.configure_model()
    assert shipped.reference is None and full.reference is not None
    for loss, why in ((SimPOLoss(), "reference-free"), (MDPOLoss(), "corrupted images"), (KTOLoss(), "KL reference")):
        with pytest.raises(ValueError, match=f"--model.ref_logps_from_data: .*{why}"):
            VisionDPOModule("tiny:llava", loss=loss, ref_logps_from_data=True)
