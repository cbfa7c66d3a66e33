"""vpa_lightning.export: PEFT adapter and merged model of a trained tiny LLaVA reload with the same log-probs."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from vpa_lightning.export import export, main
from vpa_lightning.models.logps import PreferenceGroup, build_group_batch, group_logps
from vpa_lightning.module import VisionDPOModule, load_vlm


def _image(w: int, h: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


GROUPS = [
    PreferenceGroup(_image(40, 30, 0), "What is in the image?", ["A red circle.", "Two blue squares on grass."]),
    PreferenceGroup(_image(32, 32, 1), "Describe the picture.", ["Green.", "It is a yellow triangle", "Nothing"]),
]


def _logps(model, processor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return group_logps(model, build_group_batch(processor, GROUPS)).sum_logps


def _reload_and_compare(module: VisionDPOModule, written: dict, expected: torch.Tensor) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base, _ = load_vlm(module.model_name_or_path, seed=module.hparams.seed)
    adapter = PeftModel.from_pretrained(base, str(written["adapter"]))
    adapter_proc = AutoProcessor.from_pretrained(str(written["adapter"]))
    torch.testing.assert_close(_logps(adapter, adapter_proc), expected, atol=1e-4, rtol=1e-5)

    plain = AutoModelForImageTextToText.from_pretrained(str(written["merged"]))
    assert not any("lora" in n for n, _ in plain.named_parameters())
    processor = AutoProcessor.from_pretrained(str(written["merged"]))
    torch.testing.assert_close(_logps(plain, processor), expected, atol=1e-4, rtol=1e-5)


def _perturb(module: VisionDPOModule, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("freeze_vision", [True, False], ids=["frozen-vision", "trained-vision"])
def test_export_module(tmp_path, freeze_vision):
    module = VisionDPOModule("tiny:llava", lora_r=4, lora_alpha=8, lora_dropout=0.1, freeze_vision=freeze_vision)
    _perturb(module)
    expected = _logps(module.model, module.processor)
    base_logps = _logps(load_vlm("tiny:llava")[0], module.processor)
    assert not torch.allclose(expected, base_logps, atol=1e-3)  # the export must carry the change

    written = export(module, tmp_path / "out", merged=True)
    assert set(written) == {"adapter", "merged"}
    config = json.loads((written["adapter"] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert (config["modules_to_save"] is None) == freeze_vision
    assert (written["adapter"] / "adapter_model.safetensors").is_file()
    # the in-memory module is left as it was (merge ran on a copy)
    assert any("lora_A" in n for n, _ in module.model.named_parameters())
    torch.testing.assert_close(_logps(module.model, module.processor), expected)
    _reload_and_compare(module, written, expected)


def test_export_adapter_only(tmp_path):
    module = VisionDPOModule("tiny:llava", lora_r=4, lora_alpha=8)
    written = export(module, tmp_path, merged=False)
    assert set(written) == {"adapter"} and not (tmp_path / "merged").exists()


def test_fit_then_export_cli(demo_shards, tmp_path, capsys):
    import lightning.pytorch as pl

    from vpa_lightning import PreferenceDataModule

    module = VisionDPOModule("tiny:llava", lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=0.05, warmup_ratio=0.0)
    data = PreferenceDataModule(str(demo_shards), batch_size=4, shuffle_buffer=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = _logps(module.model, module.processor)
    assert not torch.allclose(expected, _logps(load_vlm("tiny:llava")[0], module.processor), atol=1e-4)

    written = main([str(ckpt), str(tmp_path / "export"), "--merged"])
    out = capsys.readouterr().out
    assert f"adapter: {tmp_path / 'export' / 'adapter'}" in out and "merged:" in out
    _reload_and_compare(module, written, expected)
