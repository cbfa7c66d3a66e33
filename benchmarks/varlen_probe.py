"""Probe of torch's variable-length flash attention for shared-prefix groups (issue 22, GPU only).

    python benchmarks/varlen_probe.py [--json PATH]

Questions it answers on the GPU image (torch 2.11 there): is ``torch.nn.attention.varlen.varlen_attn`` present
and with which signature; is its causal mask aligned to the bottom right when a query sequence is shorter than
its key sequence (a response's queries over prefix + response keys); do its outputs and gradients match plain
SDPA run per segment in float32; and how fast is it against SDPA with the packed boolean block mask the SDPA path
uses, at LLaVA-7B widths (32 heads of 128) with 576-token image prefixes.
"""

from __future__ import annotations

import argparse
import inspect
import json

import torch
import torch.nn.functional as F


def layout(prefix: list[int], responses: list[list[int]], device: str):
    """Query sequences [prefix_g, r_g1, ..., r_gK] over the flat token order (each group's prefix then its
    responses); key sequences: prefix_g alone, then prefix_g + r_gj for each response (gathered)."""
    cu_q, cu_k, key_index = [0], [0], []
    start = 0
    for p, rs in zip(prefix, responses):
        pre = list(range(start, start + p))
        cu_q.append(cu_q[-1] + p)
        cu_k.append(cu_k[-1] + p)
        key_index += pre
        col = start + p
        for n in rs:
            cu_q.append(cu_q[-1] + n)
            cu_k.append(cu_k[-1] + p + n)
            key_index += pre + list(range(col, col + n))
            col += n
        start = col
    t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    lq = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lk = [b - a for a, b in zip(cu_k, cu_k[1:])]
    return t(cu_q), t(cu_k), torch.tensor(key_index, device=device), max(lq), max(lk), start


def reference(q, k, v, cu_q, cu_k):
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        lq, lk = b - a, d - c
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)  # bottom-right causal
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                                           v[c:d].transpose(0, 1)[None], attn_mask=mask)
        out[a:b] = o[0].transpose(0, 1)
    return out


def call(fn, q, k, v, cu_q, cu_k, mq, mk):
    params = inspect.signature(fn).parameters
    if "is_causal" in params:
        return fn(q, k, v, cu_q, cu_k, mq, mk, is_causal=True)
    return fn(q, k, v, cu_q, cu_k, mq, mk, window_size=(-1, 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict = {"torch": torch.__version__}
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        out["varlen_attn"] = f"missing: {exc}"
        print(json.dumps(out))
        return
    out["signature"] = str(inspect.signature(varlen_attn))
    dev = "cuda"
    torch.manual_seed(0)
    h, d = 8, 64
    prefix, responses = [37, 5, 130], [[3, 20], [1, 1, 7, 9], [64]]
    cu_q, cu_k, idx, mq, mk, total = layout(prefix, responses, dev)
    q = torch.randn(total, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    o = call(varlen_attn, q, k.index_select(0, idx), v.index_select(0, idx), cu_q, cu_k, mq, mk)
    go = torch.randn_like(o)
    gq, gk, gv = torch.autograd.grad(o, (q, k, v), go)
    q32, k32, v32 = (t.detach().double().requires_grad_() for t in (q, k, v))
    r = reference(q32, k32.index_select(0, idx), v32.index_select(0, idx), cu_q, cu_k)
    rq, rk, rv = torch.autograd.grad(r, (q32, k32, v32), go.double())
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    out["rel_err"] = {"out": rel(o, r), "dq": rel(gq, rq), "dk": rel(gk, rk), "dv": rel(gv, rv)}
    # top-left alignment would differ: prove the test can tell
    tl = []
    for i in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        m = torch.ones(b - a, e - c, dtype=torch.bool, device=dev).tril()
        tl.append(F.scaled_dot_product_attention(q32[a:b].transpose(0, 1)[None], k32.index_select(0, idx)[c:e].transpose(0, 1)[None],
                                                 v32.index_select(0, idx)[c:e].transpose(0, 1)[None], attn_mask=m)[0].transpose(0, 1))
    out["rel_err_vs_top_left"] = rel(o, torch.cat(tl).detach())

    # speed at LLaVA-7B widths: 8 groups, 576 image + 40 prompt tokens, 4 responses of 60-120 tokens
    h, d = 32, 128
    gen = torch.Generator().manual_seed(1)
    prefix = [616] * 8
    responses = [[int(x) for x in torch.randint(60, 121, (4,), generator=gen)] for _ in prefix]
    cu_q, cu_k, idx, mq, mk, total = layout(prefix, responses, dev)
    q, k, v = (torch.randn(total, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn(total, h, d, device=dev, dtype=torch.bfloat16)

    def run_varlen():
        o = call(varlen_attn, q, k.index_select(0, idx), v.index_select(0, idx), cu_q, cu_k, mq, mk)
        torch.autograd.grad(o, (q, k, v), go)

    # SDPA: the packed rows of the SDPA path: one row per group here (segment = prefix + its responses), block mask
    seg_len = [p + sum(r) for p, r in zip(prefix, responses)]
    width = max(seg_len)
    allowed = torch.zeros(len(prefix), width, width, dtype=torch.bool, device=dev)
    for g, (p, rs) in enumerate(zip(prefix, responses)):
        m = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
        allowed[g, :p, :p] = m
        col = p
        for n in rs:
            allowed[g, col:col + n, :p] = True
            allowed[g, col:col + n, col:col + n] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
            col += n
        allowed[g, col:, :] = torch.eye(width, dtype=torch.bool, device=dev)[col:]
    qs, ks, vs = (torch.randn(len(prefix), h, width, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gs = torch.randn(len(prefix), h, width, d, device=dev, dtype=torch.bfloat16)

    def run_sdpa():
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed[:, None])
        torch.autograd.grad(o, (qs, ks, vs), gs)

    def bench(fn, n=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[n // 2]

    t_var, t_sdpa = bench(run_varlen), bench(run_sdpa)
    # attention FLOPs actually needed (causal halves): fwd 4*lq*lk*d*h/2-ish; report ratio only
    out["speed_ms_fwd_bwd"] = {"varlen": t_var, "sdpa_block_mask": t_sdpa, "sdpa_over_varlen": t_sdpa / t_var,
                               "tokens": total, "heads": h, "head_dim": d}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
