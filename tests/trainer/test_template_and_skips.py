"""A model without a chat template fails at start-up naming ``--data.chat_template`` (which fixes
it); a fit that skips more than ``--data.max_skip_fraction`` of its samples fails with the reasons."""

from __future__ import annotations

import pytest

from vpa_lightning.errors import TooManySkippedError, UsageError

from .conftest import read_tar, write_tar


def _fit(module, data, tmp_path, max_steps: int = 2, max_epochs: int | None = None):
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    return trainer


def test_no_chat_template_fails_at_start_up_and_the_option_fixes_it(demo_shards, tmp_path):
    from vpa_lightning import PreferenceDataModule, VisionDPOModule

    module = VisionDPOModule("tiny:llava")
    template = tmp_path / "template.jinja"
    template.write_text(module.processor.chat_template)
    module.processor.chat_template = None  # a checkpoint that ships none (e.g. a PaliGemma base model)
    module.processor.tokenizer.chat_template = None
    data = PreferenceDataModule(str(demo_shards), batch_size=2)
    with pytest.raises(UsageError, match="--data.chat_template PATH") as err:
        _fit(module, data, tmp_path)
    assert "tiny:llava" in str(err.value) and data.skipped == {}  # before any sample was read

    data = PreferenceDataModule(str(demo_shards), batch_size=2, chat_template=str(template))
    trainer = _fit(module, data, tmp_path)
    assert trainer.global_step == 2 and data.skipped == {}
    assert module.processor.chat_template == template.read_text()  # the run (and its export) use it

    with pytest.raises(UsageError, match="--data.chat_template: no such file"):
        PreferenceDataModule(str(demo_shards), chat_template=str(tmp_path / "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content")
    with pytest.raises(UsageError, match="broken.jinja cannot render"):
        _fit(module, PreferenceDataModule(str(demo_shards), batch_size=2, chat_template=str(broken)), tmp_path)


@pytest.fixture
def quarter_bad_shard(demo_shards, tmp_path):
    """The first training shard with every 4th sample's JSON broken."""
    members = read_tar(demo_shards / "train-000000.tar")
    keys = sorted({name.split(".", 1)[0] for name, _ in members}, key=[n.split(".", 1)[0] for n, _ in members].index)
    bad = set(keys[::4])
    out = [(n, b"{not json" if n.endswith(".json") and n.split(".", 1)[0] in bad else data) for n, data in members]
    return write_tar(tmp_path / "quarter-bad.tar", out), bad, len(keys)


def test_too_many_skipped_samples_fail_the_fit_with_the_reasons(quarter_bad_shard, tmp_path):
    from vpa_lightning import PreferenceDataModule, VisionDPOModule

    path, bad, n = quarter_bad_shard
    module = VisionDPOModule("tiny:llava")
    data = PreferenceDataModule(str(path), batch_size=2, shuffle_buffer=0)
    with pytest.raises(TooManySkippedError, match=r"skipped in epoch 0, more than --data.max_skip_fraction 0.05") as err:
        _fit(module, data, tmp_path, max_steps=50, max_epochs=1)
    message = str(err.value)
    assert "invalid JSON" in message and any(k in message for k in bad)

    # a larger allowance trains through the whole epoch
    data = PreferenceDataModule(str(path), batch_size=2, shuffle_buffer=0, max_skip_fraction=0.5)
    trainer = _fit(VisionDPOModule("tiny:llava"), data, tmp_path, max_steps=50, max_epochs=1)
    assert trainer.global_step > 0 and data.skipped["malformed_sample"] == len(bad)
    with pytest.raises(UsageError, match="max_skip_fraction"):
        PreferenceDataModule(str(path), max_skip_fraction=1.5)
