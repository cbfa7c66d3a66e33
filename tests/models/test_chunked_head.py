"""The chunked LM head: same log-probs and gradients as a plain log-softmax, no [tokens, vocab] tensor kept for backward."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn

from vpa_lightning.models.chunked_head import can_fuse_head, chunked_token_logps, head_token_logps


def _plain(hidden, weight, bias, targets, cap=None):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("use_bias", [False, True])
def test_equal_logps_and_gradients(cap, use_bias) -> None:
    g = torch.Generator().manual_seed(0)
    m, h, v = 37, 16, 301
    hidden = torch.randn(m, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64) if use_bias else None
    targets = torch.randint(0, v, (m,), generator=g)
    coeff = torch.randn(m, generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: _plain(*a, cap=cap), lambda *a: chunked_token_logps(*a, chunk_size=8, cap=cap)):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if use_bias else ())]
        out = fn(leaves[0], leaves[1], leaves[2] if use_bias else None, targets)
        (out * coeff).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (a, ga), (b, gb) = results
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a.float(), rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_nothing_of_size_tokens_x_vocab_is_saved_for_backward() -> None:
    m, h, v, chunk = 64, 8, 1000, 16
    hidden = torch.randn(m, h, requires_grad=True)
    head = nn.Linear(h, v, bias=False)
    targets = torch.randint(0, v, (m,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head_token_logps(head, hidden, targets, chunk_size=chunk).sum().backward()
    assert max(saved) <= v * h  # the weight itself; never [m, v] logits (64,000 elements)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _plain(hidden, head.weight, None, targets).sum().backward()
    assert max(saved) >= m * v  # the plain path keeps the logits


def test_frozen_head_and_hooked_head() -> None:
    m, h, v = 10, 8, 50
    hidden = torch.randn(m, h, requires_grad=True)
    head = nn.Linear(h, v).requires_grad_(False)
    targets = torch.randint(0, v, (m,))
    assert can_fuse_head(head)
    out = head_token_logps(head, hidden, targets, chunk_size=3)
    out.sum().backward()
    assert head.weight.grad is None and hidden.grad is not None
    calls = []
    handle = head.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert not can_fuse_head(head)  # hooks (ZeRO-3 gathers, user hooks) -> the module is called
        torch.testing.assert_close(head_token_logps(head, hidden, targets, chunk_size=3), out)
        assert len(calls) == 4
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="chunk_size"):
        head_token_logps(head, hidden, targets, chunk_size=0)
    assert head_token_logps(head, hidden[:0], targets[:0]).shape == (0,)


def test_hidden_method_equals_forward_with_gradients() -> None:
    from vpa_lightning.models import PreferenceGroup, build_group_batch, build_tiny_vlm, group_logps
    from PIL import Image

    model, processor = build_tiny_vlm("llava", seed=1)
    img = Image.new("RGB", (28, 28), (200, 30, 40))
    batch = build_group_batch(processor, [PreferenceGroup(img, "What is it?", ["A red square.", "A cat on a sofa."])])
    head = model.get_output_embeddings()
    grads = []
    outs = []
    for method in ("forward", "hidden"):
        model.zero_grad()
        out = group_logps(model, batch, method=method, chunk_size=3)
        (out.sum_logps * torch.tensor([1.0, -2.0])).sum().backward()
        outs.append(out.sum_logps.detach())
        grads.append((head.weight.grad.clone(), model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float32 sums in another order (BLAS, torch version)
