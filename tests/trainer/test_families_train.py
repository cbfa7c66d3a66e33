"""Every family trains through ``VisionDPOModule`` in the three modes (full fine-tuning, LoRA, each
with and without prefix sharing): one optimiser step on a batch mixing a two-image group and a
one-image group (plus a text-only group where the family batches it), finite loss, the trainable
weights move, and the policy's log-probs before the step equal the reference's (same weights)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from vpa_lightning.data.datamodule import GroupCollator, PreferenceExample
from vpa_lightning.models import PreferenceGroup
from vpa_lightning.models.tiny import TINY_FAMILIES
from vpa_lightning.module import VisionDPOModule

MODES = {"full": {"lora": False}, "lora": {"lora": True}, "lora_prefix_sharing": {"lora": True, "prefix_sharing": True},
         "full_prefix_sharing": {"lora": False, "prefix_sharing": True}}


def _examples(family: str) -> list[PreferenceExample]:
    a, b = Image.new("RGB", (80, 40), (220, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 220))
    groups = [
        PreferenceGroup(None, "Which is red?", ["The first one.", "The second."], id="two", images=[a, b]),
        PreferenceGroup(b, "What colour is it?", ["Blue.", "It is red.", "Green"], id="one"),
    ]
    if family not in ("paligemma", "mllama"):  # no text-only input / no mixed batches (README)
        groups.append(PreferenceGroup(None, "Say hello.", ["Hello there.", "No."], id="text", images=[]))
    return [
        PreferenceExample(key=g.id, group=g, pairs=[(0, 1)] + ([(0, 2)] if len(g.responses) > 2 else []),
                          probability=[1.0] * (1 + (len(g.responses) > 2)), margin=[1.0] * (1 + (len(g.responses) > 2)))
        for g in groups
    ]


@pytest.mark.parametrize(("family", "mode"), [(f, m) for f in TINY_FAMILIES for m in MODES])
def test_family_trains(family, mode) -> None:
    torch.manual_seed(0)
    module = VisionDPOModule(f"tiny:{family}", learning_rate=1e-2, warmup_ratio=0.0, lora_r=4, lora_alpha=8,
                             **MODES[mode])
    batch = GroupCollator(module.processor)(_examples(family))
    assert len(batch["keys"]) == len(_examples(family)) and batch["skipped"] == []
    out = module.compute_loss(batch)
    # nothing trained yet: policy == reference, so every reward is 0
    torch.testing.assert_close(out["chosen_rewards"], torch.zeros_like(out["chosen_rewards"]), atol=1e-4, rtol=0)
    loss = out["losses"].mean()
    assert torch.isfinite(loss)
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    torch.optim.SGD(trainable, lr=1.0).step()
    assert any(not torch.equal(p, q) for p, q in zip(trainable, before))
