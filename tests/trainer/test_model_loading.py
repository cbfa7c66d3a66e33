"""Model creation in ``configure_model`` (issue 15): ``__init__`` allocates no weights, the hook is
idempotent, and the full-fine-tuning reference is a frozen submodule (sharded by the strategy like the
policy) that never enters the optimizer or a checkpoint and is rebuilt from the source on reload."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint

from vpa_lightning import PreferenceDataModule, VisionDPOModule
from vpa_lightning.models import build_tiny_vlm, group_logps


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attached(module: VisionDPOModule) -> VisionDPOModule:
    module.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)  # as fit/validate do
    return module


def test_init_allocates_no_weights_and_configure_model_is_idempotent():
    module = _attached(VisionDPOModule("tiny:llava", lora=False))
    assert module.processor is not None  # the data module takes it before the weights exist
    assert "model" not in module._modules and module.reference is None and _numel(module) == 0
    module.configure_model()
    policy, reference = module.model, module.reference
    assert _numel(policy) > 0 and _numel(reference) == _numel(policy)
    module.configure_model()  # Lightning calls it for fit, validate, test, load_from_checkpoint ...
    assert module.model is policy and module.reference is reference
    assert _numel(module) == 2 * _numel(policy)


def test_model_is_created_on_first_use_outside_a_trainer():
    lora = VisionDPOModule("tiny:llava")  # LoRA: no reference at all
    assert _numel(lora) == 0
    assert [n for n, _ in lora.model.named_parameters() if "lora_A" in n] and lora.reference is None
    # full fine-tuning without a Trainer (export, eval): the policy only, the reference on first use
    full = VisionDPOModule("tiny:llava", lora=False)
    full.configure_model()
    assert _numel(full.model) > 0 and full.reference is None


def test_construction_under_the_meta_device():
    """What a sharded strategy's empty-init context does: construction must not need real tensors."""
    with torch.device("meta"):
        module = VisionDPOModule("tiny:qwen2_vl", lora=False)
    _attached(module)
    with torch.device("meta"):
        assert _numel(module) == 0
        module.configure_model()  # as Lightning does, inside the strategy's tensor-init context
    assert module.model.device.type == "meta" and module.reference.device.type == "meta"


def test_full_finetuning_reference_is_frozen_and_never_saved(demo_shards, tmp_path):
    torch.manual_seed(0)
    module = VisionDPOModule("tiny:llava", lora=False, learning_rate=1e-3)
    dm = PreferenceDataModule(str(demo_shards), batch_size=2, shuffle_buffer=8)
    modes: list[bool] = []
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
            LambdaCallback(on_train_batch_start=lambda t, m, *_: modes.append(m.reference.training)),
        ],
    )
    trainer.fit(module, dm)
    reference = module.reference
    assert reference is not None and modes == [False, False]  # eval (no dropout) while the policy trains
    assert not any(p.requires_grad for p in reference.parameters())
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer and not in_optimizer & {id(p) for p in reference.parameters()}

    base = dict(build_tiny_vlm("llava", seed=0)[0].named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in reference.named_parameters())  # untouched by training
    policy = dict(module.model.named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in policy.items() if p.requires_grad)

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(state) >= {f"model.{n}" for n in policy} and not any("reference" in k for k in state)

    loaded = VisionDPOModule.load_from_checkpoint(ckpt)  # strict: every policy weight must be there
    assert loaded.strict_loading
    for n, p in loaded.model.named_parameters():
        torch.testing.assert_close(p, policy[n], rtol=0, atol=0)
    assert loaded.reference is None  # without a Trainer (export, eval) no second model is loaded ...
    inputs = next(iter(dm.train_dataloader()))["inputs"]
    with torch.no_grad():
        expected = group_logps(build_tiny_vlm("llava", seed=0)[0], inputs).sum_logps
    torch.testing.assert_close(loaded.reference_logps(inputs).sum_logps, expected)  # ... until it is used
    assert all(torch.equal(p, base[n]) for n, p in loaded.reference.named_parameters())  # from the source

    broken = torch.load(ckpt, weights_only=False)
    del broken["state_dict"]["model.lm_head.weight"]
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(RuntimeError, match="model.lm_head.weight"):
        VisionDPOModule.load_from_checkpoint(tmp_path / "broken.ckpt")


def test_fsdp_shards_the_reference_with_the_policy_and_checkpoints_leave_it_out(tmp_path):
    """torch FSDP on CPU (gloo, one process; Lightning's FSDPStrategy itself needs CUDA): the reference is
    in FSDP's flat parameters like the policy, a full state dict can be taken (FSDP's own hook needs the
    reference keys, so they are dropped in on_save_checkpoint, not before) and loads back strictly."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = _attached(VisionDPOModule("tiny:llava", lora=False))
        module.configure_model()
        wrapped = FSDP(module, device_id=torch.device("cpu"), use_orig_params=True)
        managed = set(wrapped._flat_param._fqns)  # one FSDP unit (no auto-wrap policy): one flat parameter
        assert any(f.startswith("reference_model.") for f in managed) and any(f.startswith("model.") for f in managed)
        full = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, full):
            checkpoint = {"state_dict": wrapped.state_dict()}
        module.on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        assert any(k.startswith("model.") for k in state) and not any("reference" in k for k in state)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, full):
            wrapped.load_state_dict(state, strict=True)
    finally:
        dist.destroy_process_group()
