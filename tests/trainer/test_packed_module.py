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


@pytest.mark.parametrize("lora", [True, False])
def test_packed_with_checkpointing_gives_the_plain_loss(batch, lora):
    outs, grads = [], []
    for packed in (False, True):
        torch.manual_seed(0)
        module = VisionDPOModule("tiny:llava", lora=lora, lora_dropout=0.0, packed=packed, gradient_checkpointing=packed)
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
    with pytest.raises(ValueError, match="--model.packed and --model.prefix_sharing"):
        VisionDPOModule("tiny:llava", packed=True, prefix_sharing=True)
    with pytest.raises(ValueError, match="--model.pack_tokens"):
        VisionDPOModule("tiny:llava", packed=True, pack_tokens=0)
    plain = VisionDPOModule("tiny:llava", packed=False)
    packed = VisionDPOModule("tiny:llava", packed=True)
    inputs = batch["inputs"]
    assert plain.forward_tokens(batch) == int(inputs.model_inputs["attention_mask"].sum())
    from vpa_lightning.models.packed import pack_groups

    assert packed.forward_tokens(batch) == pack_groups(packed.model, inputs).tokens < plain.forward_tokens(batch)
