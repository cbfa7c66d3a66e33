"""--model.packed: the module's losses, rewards and gradients equal the plain path's, with gradient checkpointing on,
under LoRA and full fine-tuning; flag checks; the FLOP token count used by ThroughputLog."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vpa_lightning import PreferenceDataModule, VisionDPOModule  # noqa: E402

from .test_module import _perturb_lora  # noqa: E402


@pytest.fixture(scope="module")
def batch(demo_shards, tiny_llava):
    _, processor = tiny_llava
    dm = PreferenceDataModule(str(demo_shards), batch_size=3, processor=processor)
    return next(iter(dm.val_dataloader()))


@pytest.mark.parametrize(("lora", "attention"), [(True, "auto"), (False, "auto"), (True, "varlen")])
def test_packed_with_checkpointing_gives_the_plain_loss(batch, lora, attention, no_pack_fallback):
    """Against ``--model.packed false``, failing if packing fell back to the plain path; ``varlen``: the
    variable-length attention path (its reference kernel on CPU; the flash kernel on CUDA)."""
    outs, grads = [], []
    for packed in (False, True):
        torch.manual_seed(0)
        module = VisionDPOModule("tiny:llava", lora=lora, lora_dropout=0.0, packed=packed, gradient_checkpointing=packed,
                                 packed_attention=attention)
        if lora:
            _perturb_lora(module)
        else:  # move the policy away from its reference so rewards are not all 0
            with torch.no_grad():
                module.model.get_output_embeddings().weight.mul_(1.5)
        out = module.compute_loss(batch)
        out["losses"].mean().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None]))
    assert float(outs[0]["chosen_rewards"].abs().max()) > 1e-3
    for key in ("losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(outs[1][key].detach(), outs[0][key].detach(), rtol=1e-4, atol=1e-4)
    assert float(torch.linalg.vector_norm(grads[1] - grads[0]) / torch.linalg.vector_norm(grads[0])) < 1e-4


def test_packed_flags_and_forward_tokens(batch):
    default = VisionDPOModule("tiny:llava")
    assert default.packed and default.logps_options["pack"] == "auto"  # packed by default, falling back per batch
    assert not VisionDPOModule("tiny:llava", prefix_sharing=True).packed  # the explicit one wins
    with pytest.raises(ValueError, match="--model.pack_tokens"):
        VisionDPOModule("tiny:llava", packed=True, pack_tokens=0)
    plain = VisionDPOModule("tiny:llava", packed=False)
    packed = VisionDPOModule("tiny:llava", packed=True)
    inputs = batch["inputs"]
    assert plain.forward_tokens(batch) == int(inputs.model_inputs["attention_mask"].sum())
    from vpa_lightning.models.packed import pack_groups

    assert packed.forward_tokens(batch) == pack_groups(packed.model, inputs).tokens < plain.forward_tokens(batch)


def test_packed_falls_back_to_plain_for_rows_without_a_shared_prompt(batch):
    """pack="auto" (the module's): a batch it cannot pack runs the plain path, with one warning; pack=True raises."""
    from vpa_lightning.models.logps import GroupBatch, group_logps
    from vpa_lightning.models.packed import PackingUnsupported

    module = VisionDPOModule("tiny:llava", packed=True)
    inputs = batch["inputs"]
    one_group = GroupBatch(inputs.model_inputs, inputs.labels, torch.zeros_like(inputs.group_index), [inputs.labels.shape[0]],
                           inputs.prompt_lengths, inputs.truncated)
    with pytest.raises(PackingUnsupported):
        group_logps(module.model, one_group, pack=True)
    with torch.no_grad(), pytest.warns(UserWarning, match="using the plain path"):
        fallback = group_logps(module.model, one_group, **module.logps_options)
        plain = group_logps(module.model, one_group)
    torch.testing.assert_close(fallback.sum_logps, plain.sum_logps)
