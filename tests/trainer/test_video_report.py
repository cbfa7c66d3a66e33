"""The report's greedy answers (``PreferenceReport(answer_scorer=...)``) on video validation shards: a family that
takes video answers the video samples (their frames reach ``generate``), one without skips them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("av")
pytest.importorskip("torchvision")

import torch  # noqa: E402

from vpa_lightning.callbacks import PreferenceReport  # noqa: E402
from vpa_lightning.models import build_tiny_vlm  # noqa: E402

from .test_video_fit import _shard  # noqa: E402


def any_answer(question: str, answer: str, reference: str) -> bool:
    """A scorer for the test: every non-empty answer is right."""
    return bool(answer)


def _answer(tmp_path, family: str, monkeypatch):
    from vpa_lightning.data.datamodule import PreferenceDataModule
    from vpa_lightning.models import generation

    model, processor = build_tiny_vlm(family)
    shard = _shard(tmp_path, n=4)
    datamodule = PreferenceDataModule(train_shards=str(shard), val_shards=str(shard), processor=processor, batch_size=2,
                                      video_fps=2, video_max_frames=4, num_workers=0)
    seen = []
    original = generation.encode_for_generation

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(generation, "encode_for_generation", spy)
    trainer = SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    pl_module = SimpleNamespace(model=model, processor=processor, device=torch.device("cpu"))
    report = PreferenceReport(answer_scorer="tests.trainer.test_video_report.any_answer", max_new_tokens=4)
    into: dict[str, float] = {}
    return report.answer(trainer, pl_module, into), into, seen


def test_video_samples_get_greedy_answers(tmp_path, monkeypatch) -> None:
    answers, into, seen = _answer(tmp_path, "qwen2_vl", monkeypatch)
    assert len(answers) == 4 and all(isinstance(a, str) for *_, a in answers)
    assert list(into) == ["val/greedy/correct"]  # scored
    assert sum(int(enc["video_grid_thw"].shape[0]) for enc in seen) == 4  # every sample's video went to generate


def test_a_family_without_video_skips_them(tmp_path, monkeypatch) -> None:
    answers, into, seen = _answer(tmp_path, "llava", monkeypatch)
    assert answers == [] and seen == [] and into == {}
