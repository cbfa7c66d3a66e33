"""The module gives each loss what it declares: reference-free losses make no reference forward (counted),
IPO gets averaged log-probs, LD-DPO / WPO get per-token values on both log-prob paths, listwise losses run on
the one-forward-per-group batch with the reference cache, KTO gets labels and mismatched rows, BCO's shift is
checkpointed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from vpa_lightning import PreferenceDataModule, VisionDPOModule
from vpa_lightning.losses import (
    BCOPairLoss,
    CombinedLoss,
    DPOLoss,
    IPOLoss,
    KTOLoss,
    LiPOLambdaLoss,
    ORPOLoss,
    PlackettLuceLoss,
    SFTLoss,
    SimPOLoss,
)
from vpa_lightning.models import group_logps

from .test_module import _perturb_lora


@pytest.fixture(scope="module")
def batch(demo_shards, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(str(demo_shards), batch_size=3, processor=processor)
    return next(iter(dm.val_dataloader()))




def count_forwards(module: VisionDPOModule) -> list[int]:
    """A counter of the language model's forward calls (policy, reference and any other pass)."""
    calls = [0]
    decoder = module.model.get_decoder() if hasattr(module.model, "get_decoder") else module.model
    decoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("loss", [SimPOLoss(), ORPOLoss(), CombinedLoss([SimPOLoss(), SFTLoss()])], ids=type)
@pytest.mark.parametrize("lora", [True, False])
def test_reference_free_losses_do_no_reference_work(batch, loss, lora, tmp_path, monkeypatch):
    module = VisionDPOModule("tiny:llava", loss=loss, lora=lora, reference_cache_dir=str(tmp_path / "cache"))
    module.configure_model()
    assert module.reference is None and module.reference_cache_dir is None  # no frozen copy, no cache
    monkeypatch.setattr(module, "_reference_sums", lambda *_: pytest.fail("reference log-probs requested"))
    with pytest.raises(RuntimeError, match="reference-free"):
        module.reference_logps(batch["inputs"])
    calls = count_forwards(module)
    out = module.compute_loss(batch)
    assert calls[0] == 1  # the policy forward only
    out["loss"].backward()
    assert not (tmp_path / "cache").exists()


def test_reference_losses_make_two_forwards(batch):
    module = VisionDPOModule("tiny:llava")
    calls = count_forwards(module)
    module.compute_loss(batch)
    assert calls[0] == 2 and module.reference is None  # LoRA: adapters disabled, no copy
    full = VisionDPOModule("tiny:llava", lora=False)
    full.reference_logps(batch["inputs"])
    assert full.reference is not None


def test_ipo_gets_length_averaged_logps(batch):
    module = VisionDPOModule("tiny:llava", loss=IPOLoss(beta=0.5), lora_dropout=0.0)
    _perturb_lora(module)
    out = module.compute_loss(batch)
    with torch.no_grad():
        pol = group_logps(module.model, batch["inputs"])
        ref = module.reference_logps(batch["inputs"])
    ratio = pol.mean_logps - ref.mean_logps
    c, r = batch["chosen"], batch["rejected"]
    expected = (ratio[c] - ratio[r] - 1.0) ** 2
    torch.testing.assert_close(out["losses"].detach(), expected, rtol=1e-4, atol=1e-5)
    summed = VisionDPOModule("tiny:llava", loss=IPOLoss(beta=0.5), average_logps=False)
    assert not summed.loss_fn.average_logps  # --model.average_logps false overrides the loss


@pytest.mark.parametrize(
    "loss",
    [DPOLoss(ld_alpha=0.5), DPOLoss(pair_weighting="wpo"), PlackettLuceLoss(), LiPOLambdaLoss(), KTOLoss(kl_reference_point=False)],
    ids=lambda x: repr(x).split("(")[0] + ("-ld" if getattr(x, "ld_alpha", None) else "") + ("-wpo" if getattr(x, "pair_weighting", "") == "wpo" else ""),
)
def test_prefix_sharing_gives_the_same_loss(batch, loss, no_pack_fallback):
    """Per-token log-probs (LD-DPO), log sum p^2 (WPO) and the group losses agree between the plain
    (``packed=False``: packing is the default), the prefix-shared and the packed forward (which must not fall back)."""
    outs, grads = [], []
    for mode in ({"packed": False}, {"prefix_sharing": True}, {"packed": True}):
        module = VisionDPOModule("tiny:llava", loss=loss, lora_dropout=0.0, **mode)
        _perturb_lora(module)
        out = module.compute_loss(batch)
        out["loss"].backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for n, p in module.model.named_parameters() if "lora_" in n]))
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out["loss"].detach(), outs[0]["loss"].detach(), rtol=1e-4, atol=1e-5)
        assert float(torch.linalg.vector_norm(grad - grads[0]) / torch.linalg.vector_norm(grads[0])) < 1e-3


def test_token_logps_sum_to_sequence_logps(batch):
    module = VisionDPOModule("tiny:llava", lora_dropout=0.0)
    _perturb_lora(module)
    for share in (False, True):
        with torch.no_grad():
            out = group_logps(module.model, batch["inputs"], share_prefix=share, token_logps=True, sq_probs=True)
        torch.testing.assert_close(out.token_logps.sum(1), out.sum_logps, rtol=1e-5, atol=1e-4)
        # log sum p^2 <= log max p: never above 0, and the WPO weight exp(mean(logp - that)) is finite
        assert (out.log_sum_sq_probs <= 1e-6).all()


def test_listwise_runs_on_cached_references(batch, tmp_path, monkeypatch):
    loss = PlackettLuceLoss(beta=0.2)
    first = VisionDPOModule("tiny:llava", loss=loss, lora_dropout=0.0, reference_cache_dir=str(tmp_path))
    _perturb_lora(first)
    expected = first.compute_loss(batch)
    again = VisionDPOModule("tiny:llava", loss=loss, lora_dropout=0.0, reference_cache_dir=str(tmp_path))
    _perturb_lora(again)
    monkeypatch.setattr(again, "reference_logps", lambda *a, **k: pytest.fail("reference forward on a cache hit"))
    out = again.compute_loss(batch)
    torch.testing.assert_close(out["loss"], expected["loss"])
    assert out["losses"].shape == (len(batch["keys"]),)  # one term per group (4 ranked responses each)
    assert out["chosen_rewards"].shape == batch["chosen"].shape  # reward metrics stay per pair


def test_kto_labels_and_mismatched_rows_from_the_data_module(demo_shards, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(str(demo_shards), batch_size=3, processor=processor, unpaired="threshold:3.5", mismatched_pairs=True)
    kto_batch = next(iter(dm.val_dataloader()))
    scores = kto_batch["response_score"]
    torch.testing.assert_close(kto_batch["response_label"], (scores >= 3.5).long())
    kl = kto_batch["kl_inputs"]
    assert kl is not None and kl.labels.shape[0] == kto_batch["inputs"].labels.shape[0]
    module = VisionDPOModule("tiny:llava", loss=KTOLoss(beta=0.5), lora_dropout=0.0)
    _perturb_lora(module)
    calls = count_forwards(module)
    out = module.compute_loss(kto_batch)
    assert calls[0] == 4  # reference + policy on the batch, and on the mismatched rows
    out["loss"].backward()
    n_labelled = int((kto_batch["response_label"] >= 0).sum())
    assert out["losses"].shape == (n_labelled,)
    with pytest.raises(ValueError, match="--data.unpaired"):
        PreferenceDataModule(str(demo_shards), unpaired="threshold:high")


def test_data_module_asks_the_loss_for_mismatched_rows(demo_shards):
    module = VisionDPOModule("tiny:llava", loss=KTOLoss())
    dm = PreferenceDataModule(str(demo_shards), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    dm.trainer = trainer
    trainer.lightning_module.trainer = trainer
    dm.setup("fit")
    assert dm.mismatched_pairs is True


def test_bco_shift_is_saved_and_restored(demo_shards, tmp_path):
    """MPO with BCO's running shift: a checkpoint carries the shift, a resumed module starts from it."""
    loss = CombinedLoss([DPOLoss(beta=0.1), BCOPairLoss(beta=0.1), SFTLoss()], weights=[0.8, 0.2, 1.0])
    module = VisionDPOModule("tiny:llava", loss=loss, lora_r=4, learning_rate=1e-2)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, limit_val_batches=0, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    bco = module.loss_fn.losses[1]
    assert int(bco.running_steps) == 2 and bco.delta != 0.0
    path = tmp_path / "mpo.ckpt"
    trainer.save_checkpoint(path)
    restored = VisionDPOModule.load_from_checkpoint(path)
    assert isinstance(restored.loss_fn, CombinedLoss) and restored.loss_fn.weights == [0.8, 0.2, 1.0]
    assert [type(p).__name__ for p in restored.loss_fn.losses] == ["DPOLoss", "BCOPairLoss", "SFTLoss"]
    assert restored.loss_fn.losses[1].delta == pytest.approx(bco.delta)
    assert int(restored.loss_fn.losses[1].running_steps) == 2


def test_unpaired_labels_by_threshold_and_by_pairs():
    from vpa_lightning.data.datamodule import PreferenceExample, parse_unpaired, unpaired_labels
    from vpa_lightning.models.logps import PreferenceGroup

    nan = float("nan")
    example = PreferenceExample(
        key="k",
        group=PreferenceGroup(image=None, prompt="q", responses=["a", "b", "c", "d"]),
        pairs=[(0, 1), (0, 2), (1, 2)],  # 0 always chosen, 2 always rejected, 1 both, 3 in no pair
        probability=[nan] * 3,
        margin=[nan] * 3,
        scores=[5.0, 3.5, 1.0, nan],
    )
    assert unpaired_labels(example, parse_unpaired("threshold:3.5")) == [1, 1, 0, -1]
    assert unpaired_labels(example, parse_unpaired("pairs")) == [1, -1, 0, -1]
    assert parse_unpaired(None) is None
    for bad in ("threshold", "threshold:nan", "scores:3", "pair"):
        with pytest.raises(ValueError, match="--data.unpaired"):
            parse_unpaired(bad)
