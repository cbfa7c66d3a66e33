"""Packed groups over variable-length attention (:mod:`vpa_lightning.models.varlen`): the sequence layout
implements the segment mask's rule (checked against SDPA with that mask and against SDPA run per segment), every
family that can use it gives the plain path's log-probs and gradients (the per-sequence reference kernel on CPU),
the families that cannot are refused or fall back with one warning naming why, and the plain path is unchanged
once the decoder's attention is varlen's. The flash kernel runs in ``test_packed.py``'s CUDA test (the GPU check)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from vpa_lightning.models import build_group_batch, build_tiny_vlm, varlen  # noqa: E402
from vpa_lightning.models.packed import PackingUnsupported, _allowed, _choose_attention, pack_groups  # noqa: E402
from vpa_lightning.models.tiny import TINY_FAMILIES  # noqa: E402

from .test_families import _mixed_groups  # noqa: E402
from .test_logps import _groups  # noqa: E402
from .test_packed import _assert_same, _grads  # noqa: E402

#: families whose attention is not plain causal attention within a segment
MASK_ONLY = {"gemma3": "bidirectional", "paligemma": "bidirectional", "mllama": "cross-attends"}
VARLEN_FAMILIES = [f for f in TINY_FAMILIES if f not in MASK_ONLY]


def _row(prefix: list[int], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment and response ids of one packed row laid out as the varlen path lays it out."""
    seg, resp = [], []
    for g, (p, lengths) in enumerate(zip(prefix, responses)):
        seg += [g] * p
        resp += [-1] * p
        for j, n in enumerate(lengths):
            seg += [g] * n
            resp += [j] * n
    return torch.tensor([seg]), torch.tensor([resp])


def test_layout_offsets_and_gathered_keys() -> None:
    layout = varlen.varlen_layout([3, 2], [[2, 1], [4]])
    assert layout.cu_q.tolist() == [0, 3, 5, 6, 8, 12]  # prefix 0, its responses, prefix 1, its response
    assert layout.cu_k.tolist() == [0, 3, 8, 12, 14, 20]  # each response's keys: its prefix, then itself
    assert layout.key_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 6, 7, 8, 9, 10, 11]
    assert (layout.max_q, layout.max_k, layout.total) == (4, 6, 12)
    assert layout.cu_q.dtype == layout.cu_k.dtype == torch.int32


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])  # (query heads, key/value heads): plain and grouped-query
def test_varlen_attention_is_the_segment_mask(heads) -> None:
    """Random groups (a response of one token, an empty-response group, long prefixes): the varlen attention's
    output and gradients equal SDPA over the packed row with the segment mask of the mask path, and SDPA run on
    each segment by hand (prefix alone; prefix + response for each response's tokens)."""
    gen = torch.Generator().manual_seed(0)
    prefix, responses = [7, 3, 12], [[1, 5, 2], [4], [6, 3]]
    seg, resp = _row(prefix, responses)
    t = seg.shape[1]
    hq, hkv = heads
    q, k, v = (torch.randn(1, h, t, 8, generator=gen, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv))
    layout = varlen.varlen_layout(prefix, responses)
    out, _ = varlen.varlen_attention(torch.nn.Module(), q, k, v, varlen.placeholder_mask("cpu"), scaling=0.3, vpa_varlen=layout)
    assert out.shape == (1, t, hq, 8)
    rep = hq // hkv
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    masked = F.scaled_dot_product_attention(q, kk, vv, attn_mask=_allowed(seg, resp)[:, None], scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, masked)
    by_hand = torch.empty_like(masked)
    start = 0
    for p, lengths in zip(prefix, responses):
        pre = slice(start, start + p)
        by_hand[:, pre] = F.scaled_dot_product_attention(q[:, :, pre], kk[:, :, pre], vv[:, :, pre], is_causal=True,
                                                         scale=0.3).transpose(1, 2)
        col = start + p
        for n in lengths:
            keys = torch.cat([torch.arange(start, start + p), torch.arange(col, col + n)])
            mask = torch.ones(n, p + n, dtype=torch.bool).tril(diagonal=p)  # the response's token i sees prefix + 0..i
            by_hand[:, col : col + n] = F.scaled_dot_product_attention(q[:, :, col : col + n], kk[:, :, keys], vv[:, :, keys],
                                                                       attn_mask=mask, scale=0.3).transpose(1, 2)
            col += n
        start = col
    torch.testing.assert_close(out, by_hand)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), go)
    expected = torch.autograd.grad(masked, (q, k, v), go)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", VARLEN_FAMILIES)
def test_every_causal_family_packs_over_varlen_with_the_plain_logps_and_gradients(family) -> None:
    """Text-only, two-image and one-image groups, truncated responses, gradient checkpointing (the recomputation
    must get the layout again): the varlen path runs on every layer and equals the plain path."""
    model, processor = build_tiny_vlm(family)
    full = build_group_batch(processor, _mixed_groups())
    batch = build_group_batch(processor, _mixed_groups(), max_length=int(full.prompt_lengths.max()) + 2)
    assert bool(batch.truncated.any())
    plain = _grads(model, batch)
    packed = pack_groups(model, batch, attention="varlen")
    assert packed.attention == "varlen" and packed.model_inputs["input_ids"].shape[0] == 1
    assert packed.tokens == packed.model_inputs["input_ids"].shape[1]  # no padding at all
    assert packed.tokens < int(batch.model_inputs["attention_mask"].sum())  # each prefix once
    calls = []
    original = varlen._reference

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    varlen._reference = counted
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        result = _grads(model, batch, pack=True, pack_attention="varlen")
    finally:
        varlen._reference = original
    layers = model.config.get_text_config().num_hidden_layers
    assert len(calls) == 2 * layers  # forward, then the checkpointed recomputation
    _assert_same(plain, result)
    # the decoder's attention is varlen's now; without a layout it is SDPA with SDPA's masks: the plain path holds
    model.zero_grad()
    _assert_same(plain, _grads(model, batch))


@pytest.mark.parametrize("family", sorted(MASK_ONLY))
def test_families_that_need_a_mask_refuse_varlen_and_auto_falls_back_with_one_warning(family, monkeypatch) -> None:
    model, processor = build_tiny_vlm(family)
    batch = build_group_batch(processor, _groups())
    with pytest.raises(PackingUnsupported, match=MASK_ONLY[family]):
        pack_groups(model, batch, attention="varlen")
    monkeypatch.setattr(varlen, "flash_varlen_available", lambda: True)
    from vpa_lightning.models import logps

    monkeypatch.setattr(logps, "_WARNED", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _choose_attention(model, batch, "auto", None, on_cuda=True) == "mask"
        assert _choose_attention(model, batch, "auto", None, on_cuda=True) == "mask"
    messages = [str(w.message) for w in seen if "variable-length" in str(w.message)]
    assert len(messages) == 1 and MASK_ONLY[family] in messages[0]


def test_auto_choice() -> None:
    """CPU: the mask path, silently; on CUDA with SDPA: varlen; an attention the user chose (eager, FlexAttention)
    keeps the mask path; a sliding window that cuts a segment or float32 weights without autocast: the mask."""
    model, processor = build_tiny_vlm("llava")
    batch = build_group_batch(processor, _groups())
    assert _choose_attention(model, batch, "auto", None, on_cuda=False) == "mask"
    assert pack_groups(model, batch, attention="auto").attention == "mask"
    with pytest.raises(ValueError, match="packed attention must be one of"):
        _choose_attention(model, batch, "flash", None, on_cuda=False)
    original = varlen.flash_varlen_available
    varlen.flash_varlen_available = lambda: True
    try:
        with pytest.warns(UserWarning, match="float32 weights"):
            assert _choose_attention(model, batch, "auto", None, on_cuda=True) == "mask"
        model.to(torch.bfloat16)
        with pytest.warns(UserWarning, match="sliding window"):
            assert _choose_attention(model, batch, "auto", 4, on_cuda=True) == "mask"
        assert _choose_attention(model, batch, "auto", None, on_cuda=True) == "varlen"
        assert model.config.get_text_config()._attn_implementation == varlen.NAME
        assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower keeps its own
        model.set_attn_implementation("eager")
        assert _choose_attention(model, batch, "auto", None, on_cuda=True) == "mask"
    finally:
        varlen.flash_varlen_available = original


def test_the_flash_call(monkeypatch) -> None:
    """How the kernel is called, with a stand-in for it (the flash kernel runs on CUDA only): float32 queries under
    no autocast go in as bf16, contiguous ``[T, H, D]``, grouped-query heads expanded (torch 2.11's kernel has no
    ``enable_gqa``), the offsets and maxima of the layout, the causal keyword, the scale; the output comes back in
    the queries' dtype as ``[1, T, H, D]``."""
    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        seen.update(dtype=q.dtype, shapes=(tuple(q.shape), tuple(k.shape)), contiguous=q.is_contiguous(),
                    window=window_size, scale=scale, max=(max_q, max_k))
        layout = varlen.VarlenLayout(cu_q, cu_k, torch.zeros(0), max_q, max_k, q.shape[0])
        return varlen._reference(q.float(), k.float(), v.float(), layout, scale).to(q.dtype)

    monkeypatch.setattr(varlen, "_kernel", lambda q: (fake, {"window_size": (-1, 0)}, False))
    layout = varlen.varlen_layout([3, 2], [[2, 1], [4]])
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    out, _ = varlen.varlen_attention(torch.nn.Module(), q, k, v, varlen.placeholder_mask("cpu"), scaling=0.5, vpa_varlen=layout)
    assert seen == {"dtype": torch.bfloat16, "shapes": ((12, 4, 8), (20, 4, 8)), "contiguous": True, "window": (-1, 0),
                    "scale": 0.5, "max": (4, 6)}
    assert out.dtype == torch.float32 and out.shape == (1, 12, 4, 8)
    monkeypatch.setattr(varlen, "_kernel", lambda q: None)
    exact, _ = varlen.varlen_attention(torch.nn.Module(), q, k, v, varlen.placeholder_mask("cpu"), scaling=0.5, vpa_varlen=layout)
    torch.testing.assert_close(out, exact, atol=5e-2, rtol=5e-2)  # bf16 in, same attention


def test_a_placeholder_mask_without_its_layout_is_an_error() -> None:
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(RuntimeError, match="without their layout"):
        varlen.varlen_attention(torch.nn.Module(), q, q, q, varlen.placeholder_mask("cpu"))
    layout = varlen.varlen_layout([2], [[2]])
    with pytest.raises(RuntimeError, match="4 tokens given to an attention"):
        varlen.varlen_attention(torch.nn.Module(), q, q, q, varlen.placeholder_mask("cpu"), vpa_varlen=layout)
