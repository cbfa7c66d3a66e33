"""Peak memory of the log-prob loss with a Qwen-sized vocabulary: plain logits vs the chunked LM head.

    python benchmarks/chunked_head.py                       # 151,936 vocab, 2,048 response tokens
    python benchmarks/chunked_head.py --vocab 151936 --groups 4 --responses 4 --response-tokens 128

Model: the tiny Qwen2-VL of :mod:`vpa_lightning.models.tiny` (hidden 32, 2 layers) with its token
embeddings and LM head resized to ``--vocab`` rows (151,936 = Qwen2/2.5-VL's), float32, CPU. A batch
of ``--groups`` groups x ``--responses`` responses of ``--response-tokens`` tokens each goes through
:func:`~vpa_lightning.models.logps.group_logps` and ``sum_logps.sum().backward()``; each variant runs in
its own process, and the figure is that process's peak RSS (``ru_maxrss``) minus its RSS right
before the step (model, batch and allocator already warm from one untimed step of the same kind):

* ``forward``: the model's own forward with a boolean ``logits_to_keep`` (``[M, vocab]`` logits in the
  model dtype and a float32 copy, kept for backward);
* ``hidden, module head``: decoder states at the response positions, the head called per chunk as a
  module (the head gets a no-op hook, so :func:`~vpa_lightning.models.chunked_head.can_fuse_head` says no):
  chunked in forward, but every chunk's float32 logits are kept for backward;
* ``hidden, chunked head`` (what ``logps_method="hidden"`` and the packed path use):
  :class:`~vpa_lightning.models.chunked_head.ChunkedTokenLogps`, nothing ``[M, vocab]`` kept.

The log-probs of all variants are checked equal. ``--json PATH`` writes the figures. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("forward", "hidden-module", "hidden-chunked")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec: dict) -> dict:
    import torch
    from PIL import Image

    from vpa_lightning.models import PreferenceGroup, build_group_batch, build_tiny_vlm, group_logps
    from vpa_lightning.models.tiny import _CORPUS

    torch.manual_seed(0)
    model, processor = build_tiny_vlm("qwen2_vl")
    model.resize_token_embeddings(spec["vocab"], mean_resizing=False)
    model.train()
    tok = processor.tokenizer
    words = " ".join(_CORPUS * 50)
    ids = tok(words, add_special_tokens=False)["input_ids"]
    groups = []
    for g in range(spec["groups"]):
        responses = [tok.decode(ids[(g * 7 + r) * 13 :][: spec["response_tokens"] - 1]) for r in range(spec["responses"])]
        groups.append(PreferenceGroup(Image.new("RGB", (56, 56), (g * 40 % 255, 80, 120)), "Describe the image.", responses))
    batch = build_group_batch(processor, groups)
    method = "forward" if spec["variant"] == "forward" else "hidden"
    if spec["variant"] == "hidden-module":
        model.get_output_embeddings().register_forward_hook(lambda *_: None)

    def step():
        model.zero_grad(set_to_none=True)
        out = group_logps(model, batch, method=method, chunk_size=spec["chunk_size"])
        out.sum_logps.sum().backward()
        return out

    step()  # warm: allocator, grads allocated once
    model.zero_grad(set_to_none=False)
    before = _rss_mib()
    t0 = time.perf_counter()
    out = step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": spec["variant"],
        "response_tokens_scored": int(out.n_tokens.sum()),
        "rss_before_step_mib": before,
        "peak_rss_mib": peak,
        "step_peak_over_before_mib": peak - before,
        "step_seconds": seconds,
        "sum_logps": out.sum_logps.detach().tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--responses", type=int, default=4)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/chunked_head.json"))
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        spec = json.loads(args._worker)
        Path(spec["out"]).write_text(json.dumps(worker(spec)))
        return
    import tempfile

    results = {}
    for variant in VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        spec = {"variant": variant, "vocab": args.vocab, "groups": args.groups, "responses": args.responses,
                "response_tokens": args.response_tokens, "chunk_size": args.chunk_size, "out": out}
        proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{variant} failed")
        results[variant] = json.loads(Path(out).read_text())
        os.unlink(out)
        r = results[variant]
        print(f"{variant:15s} {r['response_tokens_scored']:6d} tokens: step peak +{r['step_peak_over_before_mib']:.0f} MiB "
              f"(peak RSS {r['peak_rss_mib']:.0f} MiB), {r['step_seconds']:.2f} s", flush=True)
    import math

    ref = results["forward"]["sum_logps"]
    for v in VARIANTS[1:]:
        worst = max(abs(a - b) for a, b in zip(ref, results[v]["sum_logps"]))
        if not math.isfinite(worst) or worst > 1e-2:
            raise SystemExit(f"{v}: log-probs differ from forward by {worst}")
    m = results["forward"]["response_tokens_scored"]
    logits_mib = m * args.vocab * 4 / 2**20
    print(f"one float32 [{m} x {args.vocab}] logits tensor = {logits_mib:.0f} MiB; "
          f"chunked head saves {results['forward']['step_peak_over_before_mib'] - results['hidden-chunked']['step_peak_over_before_mib']:.0f} MiB "
          f"vs forward")
    report = {"command": " ".join([sys.executable, *sys.argv]), "args": {k: v for k, v in vars(args).items() if k != "_worker"},
              "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
              "logits_float32_mib": logits_mib, "results": {k: {kk: vv for kk, vv in v.items() if kk != "sum_logps"} for k, v in results.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
