"""``vpa sample``'s hf backend vs a loop of one ``generate`` call per answer (what a collection script does today).

    python benchmarks/sample_throughput.py                       # tiny LLaVA at 224 px, K = 4 and 8, CPU
    python benchmarks/sample_throughput.py --model tiny:llava?image_size=336 --device cuda --dtype bfloat16

Both sides answer the same demo-world prompts with the same model and settings (sampling at temperature 0.7,
top-p 0.9, ``--max-new-tokens``): vpa with :func:`vpa_lightning.collect.sample.hf_sample` (the K answers of a prompt
in one ``generate``, the image encoded once), the loop with ``processor(...)`` then ``model.generate(...)`` once per
answer. Reported per side and K: prompts/s, generated tokens/s (tokens up to and including the end of each answer),
and vpa's ratio over the loop. A warm-up prompt runs first on each side; ``--repeats`` runs, the best kept.
Not a test: timings never go in tests. ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _loop(model, processor, prompts, settings, seed: int) -> int:
    """One generate per answer: the image and the prompt encoded and prefilled K times. Returns generated tokens."""
    import torch

    from vpa_lightning.models.generation import encode_for_generation

    tok = processor.tokenizer
    param = next(model.parameters())
    stop = {tok.pad_token_id, tok.eos_token_id}
    tokens = 0
    for n, prompt in enumerate(prompts):
        images = prompt.load_images()
        for k in range(settings.k):
            enc = encode_for_generation(processor, [images], [prompt.question], [prompt.offsets])
            enc = {key: (v.to(param.device, param.dtype) if key == "pixel_values" else v.to(param.device))
                   for key, v in enc.items() if torch.is_tensor(v)}
            torch.manual_seed(seed + 1000 * n + k)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                                     top_k=None, max_new_tokens=settings.max_new_tokens, pad_token_id=tok.pad_token_id)
            row = out[0, enc["input_ids"].shape[1]:].tolist()
            tokens += next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
    return tokens


def _vpa(model, processor, prompts, settings, seed: int) -> int:
    from vpa_lightning.collect.sample import hf_sample

    return sum(n for i, p in enumerate(prompts) for _, n in hf_sample(model, processor, p, settings, seed + i))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:llava?image_size=224", help="a tiny: spec or local folder")
    ap.add_argument("--prompts", type=int, default=24, help="prompts per run")
    ap.add_argument("--ks", default="4,8", help="comma list of K")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/sample_throughput.json"))
    args = ap.parse_args(argv)

    import torch

    from vpa_lightning.collect.prompts import read_prompts
    from vpa_lightning.collect.sample import SampleSettings
    from vpa_lightning.data.demo import make_demo
    from vpa_lightning.models.loading import load_vlm

    work = Path(tempfile.mkdtemp(prefix="vpa-sample-bench-"))
    ann = make_demo(work, num_images=args.prompts, bad_records=False)
    prompts = read_prompts([ann])[0][: args.prompts + 1]
    warm, prompts = prompts[0], prompts[1:]
    model, processor = load_vlm(args.model, dtype=args.dtype)
    model = model.to(args.device).eval()
    results = {}
    for k in (int(x) for x in args.ks.split(",")):
        settings = SampleSettings(k=k, temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens)
        row = {}
        for side, fn in (("vpa", _vpa), ("loop", _loop)):
            fn(model, processor, [warm], settings, 0)
            best = None
            for rep in range(args.repeats):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                tokens = fn(model, processor, prompts, settings, 100 * rep)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                run = {"seconds": seconds, "tokens": tokens, "prompts_per_s": len(prompts) / seconds,
                       "tokens_per_s": tokens / seconds, "answers_per_s": len(prompts) * k / seconds}
                if best is None or run["prompts_per_s"] > best["prompts_per_s"]:
                    best = run
            row[side] = best
        row["prompts_per_s_ratio"] = row["vpa"]["prompts_per_s"] / row["loop"]["prompts_per_s"]
        row["tokens_per_s_ratio"] = row["vpa"]["tokens_per_s"] / row["loop"]["tokens_per_s"]
        results[f"k={k}"] = row
        print(f"K={k}: vpa {row['vpa']['prompts_per_s']:.2f} prompts/s {row['vpa']['tokens_per_s']:.0f} tokens/s | "
              f"loop {row['loop']['prompts_per_s']:.2f} prompts/s {row['loop']['tokens_per_s']:.0f} tokens/s | "
              f"{row['prompts_per_s_ratio']:.2f}x prompts/s", flush=True)
    report = {"command": " ".join([sys.executable, *sys.argv]), "args": vars(args), "prompts": len(prompts),
              "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
              "cpu": f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}",
              "torch": torch.__version__, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
