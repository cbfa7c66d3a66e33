"""Packed shared-prefix groups: same log-probs and gradients as the plain path (every tiny family, with
truncation, gradient checkpointing, several groups per row, text-only and multi-image groups, bidirectional
image/prefix attention, sliding windows), a bit-reproducible backward, and the segment mask itself."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vpa_lightning.models import build_group_batch, build_tiny_vlm, group_logps  # noqa: E402
from vpa_lightning.models.packed import _allowed, _pack, pack_groups  # noqa: E402
from vpa_lightning.models.tiny import TINY_FAMILIES  # noqa: E402

from .test_families import _mixed_groups  # noqa: E402
from .test_logps import FAMILIES, _groups  # noqa: E402


def _grads(model, batch, **kwargs):
    model.zero_grad()
    out = group_logps(model, batch, **kwargs)
    (out.sum_logps * torch.arange(1, out.sum_logps.numel() + 1, device=out.sum_logps.device)).sum().backward()
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


#: (family, sliding window forced small so that it cuts into the sequences: Gemma 3 slides on every other
#: layer (a dict of masks), Mistral on every layer; None: the family's own config)
EVERY_FAMILY = [(f, {"gemma3": 9, "llava_next": 11}.get(f)) for f in TINY_FAMILIES]


@pytest.mark.parametrize(("family", "window"), EVERY_FAMILY)
def test_every_family_packs_with_the_plain_logps_and_gradients(family, window) -> None:
    """Every tiny family: a text-only, a two-image and a one-image group (PaliGemma: image groups; Mllama: no
    text-only group in one batch), responses truncated, several groups per row, gradient checkpointing on:
    the packed path runs (no fallback) and gives the plain path's log-probs and gradients. Covers M-RoPE
    positions with 0..2 images per group, Mllama's per-token cross-attention mask, Gemma 3's bidirectional
    image blocks and PaliGemma's bidirectional prefix (from token_type_ids), PaliGemma's 1-based positions."""
    model, processor = build_tiny_vlm(family)
    if window is not None:
        model.config.get_text_config().sliding_window = window
    groups = _mixed_groups()
    if family in ("mllama", "paligemma"):
        groups = groups[1:]
    full = build_group_batch(processor, groups)
    batch = build_group_batch(processor, groups, max_length=int(full.prompt_lengths.max()) + 2)
    assert bool(batch.truncated.any()) and not bool(batch.truncated.all())
    plain = _grads(model, batch)
    packed_in = pack_groups(model, batch, max_tokens=10_000)
    if family != "mllama":  # Mllama: one group per row (a row cross-attends to its own images)
        assert packed_in.model_inputs["input_ids"].shape[0] == 1
    if window is not None:
        assert max(batch.prompt_lengths.tolist()) > window  # the window cuts into the prompt
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _assert_same(plain, _grads(model, batch, pack=True, pack_tokens=10_000))


def test_bidirectional_blocks_matter() -> None:
    """Without PaliGemma's bidirectional prefix the packed log-probs differ (the rule is not vacuous); the
    block ids: PaliGemma's whole prefix of each segment, Gemma 3's each run of image tokens."""
    from vpa_lightning.models.families import family_of
    from vpa_lightning.models.packed import _block_ids

    model, processor = build_tiny_vlm("paligemma")
    batch = build_group_batch(processor, _groups())
    family = family_of(model)
    with torch.no_grad():
        plain = group_logps(model, batch).sum_logps
        try:
            family.bidirectional_blocks = None
            causal_only = group_logps(model, batch, pack=True).sum_logps
        finally:
            del family.bidirectional_blocks
        assert (causal_only - plain).abs().max() > 1e-2
        torch.testing.assert_close(group_logps(model, batch, pack=True).sum_logps, plain, rtol=1e-5, atol=1e-4)
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    types = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1, 1, 0]])
    assert _block_ids(seg, types, "prefix").tolist() == [[0, -1, -1, 0, -1, 1, -1, -1, -1, -1]]
    assert _block_ids(seg, types, "image").tolist() == [[-1, 1, 1, -1, 2, -1, 3, 3, 3, -1]]


def _repeated_index_gathers(tensor) -> list[str]:
    """Autograd nodes of ``tensor``'s graph that index with repeated integer indices (``x[idx]``)."""
    found, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "IndexBackward0":
            for index in fn._saved_indices:
                if index is not None and not index.dtype == torch.bool and index.unique().numel() < index.numel():
                    found.append(f"{type(fn).__name__} over {tuple(fn._saved_self_sym_sizes)}")
        stack.extend(f for f, _ in fn.next_functions)
    return found


@pytest.mark.parametrize("method", ["forward", "hidden"])
def test_packed_backward_is_bit_reproducible(method) -> None:
    """A prefix end scores K responses: gathering its logits K times by indexing (``logits[idx]``) has a
    backward (``index_put_`` with accumulate) that adds with parallel float atomics on CPU once the tensor
    has 32k elements, so gradients, and a resumed run, differed in the last bits from run to run. The
    packed path gathers with ``index_select`` (its backward, ``index_add_``, adds in index order)."""
    model, processor = build_tiny_vlm("llava")
    batch = build_group_batch(processor, _groups())
    out = group_logps(model, batch, pack=True, pack_tokens=10_000, method=method)
    assert _repeated_index_gathers(out.sum_logps) == []
    first = _grads(model, batch, pack=True, pack_tokens=10_000, method=method)[1]
    again = _grads(model, batch, pack=True, pack_tokens=10_000, method=method)[1]
    assert all(torch.equal(first[k], again[k]) for k in first)


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


def _leaky(seg_id, resp_id, *args, **kwargs):
    """The segment rule with a hole: a group's responses see every earlier token of their group."""
    return _allowed(seg_id, torch.where(resp_id >= 0, 0, resp_id), *args, **kwargs)


def _lm_error(grads, reference) -> float:
    """Relative error of the language model's gradients (where packing matters) against ``reference``'s."""
    names = [n for n in reference if "language_model" in n]
    diff = sum(float(torch.linalg.vector_norm(grads[n].float() - reference[n])) ** 2 for n in names)
    return (diff / sum(float(torch.linalg.vector_norm(reference[n])) ** 2 for n in names)) ** 0.5


def check_packed_against_plain_bf16(model, batch, device_type: str, packed_attention: str) -> dict[str, float]:
    """Packed log-probs and gradients under bf16 autocast against the plain path's under the same autocast (and its
    gradients' error against float32's): a packed path that is right differs by rounding only, while a mask that
    lets responses see each other moves the log-probs by whole nats. Returns the errors measured."""
    import vpa_lightning.models.packed as packed_module

    reference = _grads(model, batch)[1]  # float32
    with torch.autocast(device_type, dtype=torch.bfloat16):
        plain_out, plain = _grads(model, batch)
        packed_out, packed = _grads(model, batch, pack=True, pack_tokens=10_000, pack_attention=packed_attention)
        saved, packed_module._allowed = packed_module._allowed, _leaky
        try:
            with torch.no_grad():
                leak = group_logps(model, batch, pack=True, pack_tokens=10_000, pack_attention="mask").sum_logps
        finally:
            packed_module._allowed = saved
    errors = {"logps": float((packed_out.sum_logps - plain_out.sum_logps).abs().max()),
              "leak": float((leak - plain_out.sum_logps).abs().max()),
              "grads": _lm_error(packed, reference), "grads_plain_bf16": _lm_error(plain, reference)}
    assert packed_out.n_tokens.tolist() == plain_out.n_tokens.tolist()
    assert errors["logps"] <= 0.25, errors  # rounding (0.01-0.06 nats on CPU)
    assert errors["leak"] > 1.0, errors  # a leaky mask could not pass the bound above
    assert errors["grads"] <= 2 * errors["grads_plain_bf16"] + 0.02, errors
    return errors


@pytest.mark.parametrize(("family", "packed_attention"), [("llava", "mask"), ("qwen2_vl", "varlen")])
def test_packed_in_bf16_is_rounding_away_from_plain(family, packed_attention) -> None:
    """The CUDA test's bounds, on the CPU (bf16 autocast there too; varlen through its reference kernel)."""
    model, processor = build_tiny_vlm(family, text_hidden=128)
    check_packed_against_plain_bf16(model.train(), build_group_batch(processor, _groups()), "cpu", packed_attention)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("family", "attn", "packed_attention"), [
    ("llava", "sdpa", "mask"), ("qwen2_vl", "sdpa", "mask"), ("llava", "flex_attention", "mask"),
    ("llava", "sdpa", "varlen"), ("qwen2_vl", "sdpa", "varlen"),
])
def test_packed_on_cuda_bf16(family, attn, packed_attention) -> None:
    """On the GPU, bf16 autocast over float32 weights (as ``bf16-mixed`` trains): packed log-probs and gradients
    through SDPA's masked kernel, FlexAttention block masks and variable-length flash attention (the flash kernel
    must run) are the plain path's up to rounding, with bounds a leaky mask fails (transformers gives Qwen2-VL no
    FlexAttention; FlexAttention's kernels need heads of >= 16 dimensions, hence the wider tiny text model)."""
    from vpa_lightning.models import varlen

    model, processor = build_tiny_vlm(family, text_hidden=128)
    model = model.to("cuda").train()
    model.set_attn_implementation(attn)
    batch = build_group_batch(processor, _groups()).to("cuda")
    calls = []
    original = varlen._kernel
    varlen._kernel = lambda q: (calls.append(q.is_cuda), original(q))[1]
    try:
        check_packed_against_plain_bf16(model, batch, "cuda", packed_attention)
    finally:
        varlen._kernel = original
    if packed_attention == "varlen":
        assert calls and all(calls) and varlen._flash() is not None, "the flash kernel did not run"


@pytest.mark.parametrize("method", ["hidden", "forward"])
def test_flex_attention_packed_rows_get_a_block_mask_and_the_attention_kernel(method, monkeypatch) -> None:
    """Under FlexAttention every decoder layer gets the packed rows' BlockMask and kernel options that force
    the attention kernel: a packed row is scored whole, and inductor's decoding kernel (which it picks for rows
    under 128 tokens) failed on the GPU check's H200 (torch 2.11). A spy stands in for the kernel here (FlexAttention
    compiles only on CUDA); the GPU test above runs the real one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((type(attention_mask).__name__, kwargs.get("kernel_options")))
        return torch.zeros_like(query).transpose(1, 2).contiguous(), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention", spy)
    model, processor = build_tiny_vlm("llava", text_hidden=64)
    model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        group_logps(model, build_group_batch(processor, _groups()), pack=True, pack_tokens=10_000, method=method)
    layers = model.config.text_config.num_hidden_layers
    assert [kind for kind, _ in seen].count("BlockMask") == layers
    assert all(options == {"FORCE_USE_FLEX_ATTENTION": True} for _, options in seen)


@pytest.mark.parametrize("method", ["hidden", "forward"])
def test_packed_token_logps_and_sq_probs(method) -> None:
    model, processor = build_tiny_vlm("llava")
    batch = build_group_batch(processor, _groups())
    with torch.no_grad():
        plain = group_logps(model, batch, method=method, token_logps=True, sq_probs=True)
        packed = group_logps(model, batch, method=method, pack=True, token_logps=True, sq_probs=True)
    torch.testing.assert_close(packed.token_logps, plain.token_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.log_sum_sq_probs, plain.log_sum_sq_probs, rtol=1e-5, atol=1e-4)
