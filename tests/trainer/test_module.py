"""VisionDPOModule: a short fit logs every metric; reference = adapters disabled; reference cache."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from vpa_lightning import PreferenceDataModule, VisionDPOModule
from vpa_lightning.losses import IPOLoss, MDPOLoss, RPOLoss
from vpa_lightning.models import build_tiny_vlm, group_logps
from vpa_lightning.module import METRIC_NAMES

STAGE_METRICS = [f"{stage}/{name}" for stage in ("train", "val") for name in METRIC_NAMES]


@pytest.fixture
def val_batch(demo_shards, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(str(demo_shards), batch_size=3, processor=processor)
    return next(iter(dm.val_dataloader()))


def _perturb_lora(module: VisionDPOModule, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # both: lora_A's init draws from the global RNG
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_fit_logs_all_metrics(demo_shards, tmp_path):
    torch.manual_seed(0)
    module = VisionDPOModule("tiny:llava", learning_rate=1e-3, lora_r=4, lora_alpha=8)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2, shuffle_buffer=8)  # processor comes from the module
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    assert set(STAGE_METRICS) <= set(trainer.logged_metrics), sorted(trainer.logged_metrics)
    for name in STAGE_METRICS:
        assert math.isfinite(float(trainer.logged_metrics[name])), name
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(STAGE_METRICS) <= set(header)
    # only LoRA weights are trainable, and they moved
    assert before and all("lora_" in n for n in before)
    changed = [n for n, p in module.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed
    assert dm.processor is module.processor


def test_lora_targets_language_model_only():
    module = VisionDPOModule("tiny:llava")
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in module.model.named_parameters() if ".lora_A" in n}
    assert lora_modules and all(".language_model." in n for n in lora_modules)
    leaves = {n.rsplit(".", 1)[-1] for n in lora_modules}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)

    unfrozen = VisionDPOModule("tiny:llava", freeze_vision=False)
    unfrozen.configure_model()  # the weights are created there (or on first use of .model)
    trainable = [n for n, p in unfrozen.named_parameters() if p.requires_grad]
    assert any("vision_tower" in n and "lora_" not in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)


def test_reference_with_disabled_adapters_equals_base_model(val_batch):
    base, _ = build_tiny_vlm("llava", seed=0)
    module = VisionDPOModule("tiny:llava", seed=0, lora_dropout=0.0)  # deterministic policy in train mode
    _perturb_lora(module)
    inputs = val_batch["inputs"]
    with torch.no_grad():
        expected = group_logps(base, inputs).sum_logps
        policy = group_logps(module.model, inputs).sum_logps
    reference = module.reference_logps(inputs).sum_logps
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapters do change the policy
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert module.model.training  # reference pass restored train mode
    with torch.no_grad():  # adapters are enabled again afterwards
        torch.testing.assert_close(group_logps(module.model, inputs).sum_logps, policy)


def test_full_finetuning_reference_is_frozen_copy(val_batch):
    base, _ = build_tiny_vlm("llava", seed=0)
    module = VisionDPOModule("tiny:llava", lora=False)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "language_model" in name:
                p.add_(0.05 * torch.randn_like(p))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    inputs = val_batch["inputs"]
    with torch.no_grad():
        expected = group_logps(base, inputs).sum_logps
    torch.testing.assert_close(module.reference_logps(inputs).sum_logps, expected, rtol=1e-5, atol=1e-5)
    assert module.reference is not None and not any("reference" in k for k in module.state_dict())


def test_cached_reference_gives_same_loss(val_batch, tmp_path, monkeypatch):
    torch.manual_seed(0)
    live = VisionDPOModule("tiny:llava", lora_dropout=0.0)
    _perturb_lora(live)
    expected = live.compute_loss(val_batch)

    cached = VisionDPOModule("tiny:llava", lora_dropout=0.0, reference_cache_dir=str(tmp_path / "cache"))
    _perturb_lora(cached)
    first = cached.compute_loss(val_batch)  # miss: computes and stores
    assert len(cached.reference_cache) == val_batch["inputs"].labels.shape[0]
    torch.testing.assert_close(first["losses"], expected["losses"])

    # a new module (a new run) reads the cache and never runs the reference
    again = VisionDPOModule("tiny:llava", lora_dropout=0.0, reference_cache_dir=str(tmp_path / "cache"))
    _perturb_lora(again)
    monkeypatch.setattr(again, "reference_logps", lambda inputs: pytest.fail("reference forward on a cache hit"))
    second = again.compute_loss(val_batch)
    assert again.reference_cache.hits == 1
    torch.testing.assert_close(second["losses"], expected["losses"])
    torch.testing.assert_close(second["chosen_rewards"], expected["chosen_rewards"])


def test_cache_misses_on_changed_response(val_batch, tmp_path):
    module = VisionDPOModule("tiny:llava", reference_cache_dir=str(tmp_path))
    module.compute_loss(val_batch)
    changed = dict(val_batch, response_sha=["0" * 16] + val_batch["response_sha"][1:])
    module.compute_loss(changed)
    assert module.reference_cache.misses == 2 and module.reference_cache.hits == 0


def test_loss_reduction_matches_pairs(val_batch):
    module = VisionDPOModule("tiny:llava", lora_dropout=0.0)
    _perturb_lora(module)
    out = module.compute_loss(val_batch)
    with torch.no_grad():
        pol = group_logps(module.model, val_batch["inputs"]).sum_logps
        ref = module.reference_logps(val_batch["inputs"]).sum_logps
    c, r = val_batch["chosen"], val_batch["rejected"]
    margin = 0.1 * ((pol[c] - ref[c]) - (pol[r] - ref[r]))
    torch.testing.assert_close(out["losses"].detach(), -torch.nn.functional.logsigmoid(margin), rtol=1e-4, atol=1e-5)
    assert out["losses"].shape == c.shape


@pytest.mark.parametrize("loss", [IPOLoss(beta=0.5), RPOLoss(alpha=1.0)])
def test_other_losses_and_averaged_logps(val_batch, loss):
    module = VisionDPOModule("tiny:llava", loss=loss, average_logps=True)
    _perturb_lora(module)
    out = module.compute_loss(val_batch)
    out["losses"].mean().backward()
    assert any(p.grad is not None for n, p in module.model.named_parameters() if "lora_" in n)
    n_tokens = group_logps(module.model, val_batch["inputs"]).n_tokens
    assert (out["chosen_logps"] > -20).all()  # averaged per token, not summed
    assert n_tokens.min() > 1


@pytest.mark.parametrize("packed", [False, True])
def test_mdpo_conditional_term_uses_a_corrupted_image(val_batch, packed):
    """mDPO's loss from the module = Eq. 2-4 on log-probs recomputed by hand on the plain path: the
    chosen responses on the corrupted image (same seed -> same corruption) under the policy and the
    reference. LoRA dropout is off: with it on, each forward draws its own dropout masks, so a value
    recomputed by hand matches only if it replays the module's forwards in the same order and shapes
    (packed rows draw masks of another shape than the plain rows), which is not what this test is about."""
    from vpa_lightning.augment import build_augmentation
    from vpa_lightning.augment.pixels import corrupt_pixel_values
    from vpa_lightning.models.logps import select_rows

    module = VisionDPOModule("tiny:llava", loss=MDPOLoss(beta=0.5), lora_dropout=0.0, packed=packed,
                             image_corruption={"name": "diffusion_noise", "step": 800})
    _perturb_lora(module)
    torch.manual_seed(7)
    out = module.compute_loss(val_batch)
    out["losses"].mean().backward()
    assert any(p.grad is not None for n, p in module.model.named_parameters() if "lora_" in n)

    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    c, r = val_batch["chosen"], val_batch["rejected"]
    rows, index = torch.unique(c, return_inverse=True)
    sub = select_rows(val_batch["inputs"], rows)
    sub.model_inputs = corrupt_pixel_values(sub.model_inputs, module.processor, build_augmentation({"name": "diffusion_noise", "step": 800}), seed=seed)
    with torch.no_grad():
        pol = group_logps(module.model, val_batch["inputs"]).sum_logps
        module.model.disable_adapter_layers()
        ref = group_logps(module.model, val_batch["inputs"]).sum_logps
        ref_bad = group_logps(module.model, sub).sum_logps[index]
        module.model.enable_adapter_layers()
        pol_bad = group_logps(module.model, sub).sum_logps[index]
    assert (pol_bad - pol[c]).abs().max() > 1e-3  # the corrupted image changes the chosen log-probs
    chosen, rejected, bad = pol[c] - ref[c], pol[r] - ref[r], pol_bad - ref_bad
    f = torch.nn.functional.logsigmoid
    expected = -f(0.5 * (chosen - rejected)) - f(0.5 * (chosen - bad)) - f(0.5 * chosen)
    torch.testing.assert_close(out["losses"].detach(), expected, rtol=1e-4, atol=1e-5)


def test_mdpo_default_corruption_is_a_small_random_crop():
    from vpa_lightning.module import MDPO_CORRUPTION

    module = VisionDPOModule("tiny:llava", loss=MDPOLoss())
    assert module.image_corruption == MDPO_CORRUPTION and max(MDPO_CORRUPTION["scale"]) <= 0.2
    assert not any("corruption" in k for k in module.state_dict())


def test_loss_needing_unknown_inputs_is_refused():
    from vpa_lightning.losses import DPOLoss

    class NeedsDepth(DPOLoss):
        extra_inputs = frozenset({"depth_map"})

    with pytest.raises(ValueError, match=r"--model.loss: NeedsDepth needs inputs .*depth_map"):
        VisionDPOModule("tiny:llava", loss=NeedsDepth())


def test_warmup_cosine_schedule():
    module = VisionDPOModule("tiny:llava", learning_rate=1.0, warmup_ratio=0.2)
    module._trainer = SimpleNamespace(max_steps=10)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] < 0.1


def test_validate_test_predict(demo_shards):
    module = VisionDPOModule("tiny:llava", lora_r=4)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (val,) = trainer.validate(module, dm, verbose=False)
    assert {f"val/{n}" for n in METRIC_NAMES} <= set(val)
    assert val["val/loss"] == pytest.approx(math.log(2), abs=1e-4)  # fresh LoRA (B = 0): policy == reference
    (test,) = trainer.test(module, dm, verbose=False)
    assert {f"test/{n}" for n in METRIC_NAMES} <= set(test)
    predictions = trainer.predict(module, dm)
    assert len(predictions) == 2
    first = predictions[0]
    assert len(first["keys"]) == 2 and first["losses"].shape == first["chosen"].shape == first["chosen_rewards"].shape


def test_loads_local_folder(tmp_path, val_batch):
    base, _ = build_tiny_vlm("llava", out_dir=tmp_path / "tiny-llava", seed=0)
    module = VisionDPOModule(str(tmp_path / "tiny-llava"), lora_dropout=0.0)
    assert type(module.model.get_base_model()).__name__ == "LlavaForConditionalGeneration"
    assert module.processor.tokenizer.eos_token == "<|end|>"
    with torch.no_grad():
        expected = group_logps(base, val_batch["inputs"]).sum_logps
    torch.testing.assert_close(module.reference_logps(val_batch["inputs"]).sum_logps, expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_same_gradients(val_batch):
    grads = []
    for checkpointing in (False, True):
        module = VisionDPOModule("tiny:llava", lora_dropout=0.0, gradient_checkpointing=checkpointing)
        layers = [m for m in module.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert layers and all(getattr(m, "gradient_checkpointing", False) == checkpointing for m in layers)
        _perturb_lora(module)
        module.train()
        module.compute_loss(val_batch)["losses"].mean().backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_bfloat16_weights(val_batch):
    module = VisionDPOModule("tiny:llava", dtype="bfloat16")
    assert next(module.model.get_base_model().parameters()).dtype == torch.bfloat16
    out = module.compute_loss(val_batch)
    assert out["losses"].dtype == torch.float32 and torch.isfinite(out["losses"]).all()
    with pytest.raises(ValueError, match="dtype"):
        VisionDPOModule("tiny:llava", dtype="int8")


def test_lora_checkpoint_keeps_trainable_weights_only(demo_shards, tmp_path, val_batch):
    loss = RPOLoss(beta=0.3, alpha=0.5)
    module = VisionDPOModule("tiny:llava", loss=loss, lora_r=4, lora_dropout=0.0, learning_rate=1e-2)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2)
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    model_keys = [k for k in state if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)
    restored = VisionDPOModule.load_from_checkpoint(path)
    assert isinstance(restored.loss_fn, RPOLoss) and (restored.loss_fn.beta, restored.loss_fn.alpha) == (0.3, 0.5)
    module.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            group_logps(restored.model, val_batch["inputs"]).sum_logps,
            group_logps(module.model, val_batch["inputs"]).sum_logps,
        )


def test_idefics3_family(demo_shards):
    module = VisionDPOModule("tiny:idefics3", lora_dropout=0.0)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in module.model.named_parameters() if ".lora_A" in n}
    assert lora_modules and all(".text_model." in n for n in lora_modules)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2, processor=module.processor)
    batch = next(iter(dm.val_dataloader()))
    base, _ = build_tiny_vlm("idefics3", seed=0)
    _perturb_lora(module)
    with torch.no_grad():
        expected = group_logps(base, batch["inputs"]).sum_logps
    torch.testing.assert_close(module.reference_logps(batch["inputs"]).sum_logps, expected, rtol=1e-5, atol=1e-5)
    out = module.compute_loss(batch)
    out["losses"].mean().backward()
    assert torch.isfinite(out["losses"]).all()


def test_prefix_sharing_flag_gives_the_same_loss(val_batch):
    """--model.prefix_sharing: same losses, rewards and gradients as the plain path (float rounding aside)."""
    outs, grads = [], []
    for share in (False, True):
        module = VisionDPOModule("tiny:llava", prefix_sharing=share, lora_dropout=0.0)
        _perturb_lora(module)
        out = module.compute_loss(val_batch)
        out["losses"].mean().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for n, p in module.model.named_parameters() if "lora_" in n]))
    for key in ("losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(outs[1][key].detach(), outs[0][key].detach(), rtol=1e-4, atol=1e-4)
    assert float(torch.linalg.vector_norm(grads[1] - grads[0]) / torch.linalg.vector_norm(grads[0])) < 1e-4


def test_prefix_sharing_flag_checks():
    with pytest.raises(ValueError, match="--model.prefix_sharing needs"):
        VisionDPOModule("tiny:llava", prefix_sharing=True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="--model.prefix_sharing needs"):
        VisionDPOModule("tiny:llava", prefix_sharing=True, logps_method="hidden")
