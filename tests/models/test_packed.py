"""Packed shared-prefix groups: same log-probs and gradients as the plain path (LLaVA, Qwen2-VL with M-RoPE,
Idefics3; with truncation, gradient checkpointing, several groups per row), and the segment mask itself."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vpa_lightning.models import build_group_batch, build_tiny_vlm, group_logps  # noqa: E402
from vpa_lightning.models.packed import _allowed, _pack, pack_groups  # noqa: E402

from .test_logps import FAMILIES, _groups  # noqa: E402


def _grads(model, batch, **kwargs):
    model.zero_grad()
    out = group_logps(model, batch, **kwargs)
    (out.sum_logps * torch.arange(1, 6)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads


def _assert_same(plain, packed):
    (a, ga), (b, gb) = plain, packed
    torch.testing.assert_close(b.sum_logps, a.sum_logps, rtol=1e-5, atol=1e-4)
    assert b.n_tokens.tolist() == a.n_tokens.tolist() and b.group_sizes == a.group_sizes
    assert ga.keys() == gb.keys()
    scale = max(float(torch.linalg.vector_norm(g)) for g in ga.values())
    for name, g in ga.items():  # float32 sums in another order: compare at the scale of the gradients
        assert float(torch.linalg.vector_norm(gb[name] - g)) <= 1e-4 * scale + 1e-3 * float(torch.linalg.vector_norm(g)), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("truncate", [False, True])
def test_packed_equals_plain_with_gradient_checkpointing(family, truncate) -> None:
    model, processor = build_tiny_vlm(family)
    groups = _groups()
    max_length = int(build_group_batch(processor, groups).prompt_lengths.max()) + 3 if truncate else None
    batch = build_group_batch(processor, groups, max_length=max_length)
    assert bool(batch.truncated.any()) == truncate
    plain = _grads(model, batch)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = _grads(model, batch, pack=True)
    _assert_same(plain, packed)


@pytest.mark.parametrize("family", FAMILIES)
def test_several_groups_per_row_and_forward_method(family) -> None:
    model, processor = build_tiny_vlm(family)
    batch = build_group_batch(processor, _groups())
    plain = _grads(model, batch)
    packed_in = pack_groups(model, batch, max_tokens=10_000)
    assert packed_in.model_inputs["input_ids"].shape[0] == 1  # both groups in one row
    # each prefix once: fewer tokens than the plain batch's
    assert packed_in.tokens < int(batch.model_inputs["attention_mask"].sum())
    _assert_same(plain, _grads(model, batch, pack=True, pack_tokens=10_000, method="forward"))


def test_eager_attention_and_unsupported_attention() -> None:
    model, processor = build_tiny_vlm("llava")
    batch = build_group_batch(processor, _groups())
    plain = _grads(model, batch)
    model.set_attn_implementation("eager")
    _assert_same(plain, _grads(model, batch, pack=True))
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        group_logps(model, batch, pack=True)


def test_segment_mask_rule() -> None:
    # one row: group 0 = prefix (2) + response a (2) + response b (1), then group 1 = prefix (1) + response (1), 1 pad
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    resp = torch.tensor([[-1, -1, 0, 0, 1, -1, 0, -1]])
    allowed = _allowed(seg, resp)[0]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False, False]  # a sees prefix + itself
    assert allowed[4].tolist() == [True, True, False, False, True, False, False, False]  # b never sees a
    assert allowed[6].tolist() == [False] * 5 + [True, True, False]  # group 1 never sees group 0
    assert allowed[7].tolist() == [False] * 7 + [True]  # padding sees itself only


def test_first_fit_packing_and_prompt_check() -> None:
    assert _pack([5, 3, 4, 2], budget=7) == [[0, 3], [1, 2]]
    assert _pack([9, 2], budget=5) == [[0], [1]]  # a longer segment gets its own row
    model, processor = build_tiny_vlm("llava")
    batch = build_group_batch(processor, _groups())
    batch.group_index = torch.zeros_like(batch.group_index)
    batch.group_sizes = [5]
    with pytest.raises(ValueError, match="do not share one prompt"):
        group_logps(model, batch, pack=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_packed_on_cuda_bf16(family, attn) -> None:
    """On the GPU: packed log-probs in bf16 through SDPA's masked kernel and FlexAttention block masks."""
    model, processor = build_tiny_vlm(family)
    model = model.to("cuda", torch.bfloat16)
    model.set_attn_implementation(attn)
    batch = build_group_batch(processor, _groups()).to("cuda")
    with torch.no_grad():
        plain = group_logps(model, batch)
        packed = group_logps(model, batch, pack=True, pack_tokens=10_000)
    torch.testing.assert_close(packed.sum_logps, plain.sum_logps, rtol=2e-2, atol=0.5)
    assert packed.n_tokens.tolist() == plain.n_tokens.tolist()


@pytest.mark.parametrize("method", ["hidden", "forward"])
def test_packed_token_logps_and_sq_probs(method) -> None:
    model, processor = build_tiny_vlm("llava")
    batch = build_group_batch(processor, _groups())
    with torch.no_grad():
        plain = group_logps(model, batch, method=method, token_logps=True, sq_probs=True)
        packed = group_logps(model, batch, method=method, pack=True, token_logps=True, sq_probs=True)
    torch.testing.assert_close(packed.token_logps, plain.token_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.log_sum_sq_probs, plain.log_sum_sq_probs, rtol=1e-5, atol=1e-4)
