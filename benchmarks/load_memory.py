"""Host memory per rank at model load: ``vpa fit`` under DDP, 2 CPU processes on gloo.

    python benchmarks/load_memory.py                                  # full fine-tuning with its reference
    python benchmarks/load_memory.py --lora --json out.json
    python benchmarks/load_memory.py --code /path/to/other/checkout   # the same run on another version
    python benchmarks/load_memory.py --fsdp [--lora] [--wrap-layers]  # torch FSDP on CPU instead of DDP

Each rank records, at ``on_train_start`` (after ``configure_model``, the DDP wrap and the optimizer;
before the first step, so no optimizer state yet), its peak resident set so far (``VmHWM``), its
resident set (``VmRSS``) and the bytes of the parameters its module holds (policy and reference), all
from ``/proc/self/status`` (Linux). The model is a tiny LLaVA widened to tens of MB
(``--model``, default ``tiny:llava?text_hidden=1024&vision_hidden=256``), float32, built from its
config. ``--code`` runs another checkout's ``vpa_lightning`` (e.g. the commit before loading moved into
``configure_model``; its compiled extension must be in place).

``--fsdp``: Lightning's FSDPStrategy and DeepSpeed need CUDA, but torch's FSDP runs on CPU over gloo, so
2 processes each create the module as Lightning would (``configure_model`` with an ``FSDPStrategy`` of 2
processes attached, so the module sets its FSDP arguments: rank 0 loads, rank 1 builds on the meta
device), wrap it in ``FullyShardedDataParallel`` as ``FSDPStrategy`` does (one unit, or with
``--wrap-layers`` one per transformer layer; full sharding; the
strategy's kwargs: ``use_orig_params``, ``sync_module_states``, ``param_init_fn``; torch's guard that
refuses ``sync_module_states`` for CPU tensors is lifted, gloo broadcasts them) and record
``VmHWM``/``VmRSS`` before and after ``configure_model`` and after the wrap (freed memory handed back
with ``malloc_trim``), and the bytes of the flat-parameter shard each rank keeps. ``--code`` with a
checkout before rank-0 loading measures every rank loading whole. On CPU the wrap materialises rank
1's empty unit on the host (its "device"); on GPUs it goes to the GPU. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _param_mb(module) -> float:
    """MB of ``module``'s parameters (0 for none)."""
    return 0.0 if module is None else round(sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20, 1)


try:  # the probe is imported by the ranks (this file is on their PYTHONPATH as ``load_memory``)
    from lightning.pytorch.callbacks import Callback

    class MemoryProbe(Callback):
        """Writes ``rank{r}.json``: VmHWM / VmRSS and the module's parameter bytes at train start."""

        def __init__(self, out_dir: str) -> None:
            self.out_dir = Path(out_dir)

        def on_train_start(self, trainer, pl_module) -> None:
            model = pl_module.model
            reference = getattr(pl_module, "reference", None)
            if reference is None and getattr(pl_module, "_reference", None):  # the layout before issue 15
                reference = pl_module._reference[0]
            record = {
                "rank": trainer.global_rank,
                "vm_hwm_mb": round(_status_kb("VmHWM") / 1024, 1),
                "vm_rss_mb": round(_status_kb("VmRSS") / 1024, 1),
                "policy_mb": _param_mb(model),
                "reference_mb": _param_mb(reference),
            }
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
except ImportError:  # pragma: no cover
    pass


def _fsdp_rank(rank: int, model: str, lora: bool, wrap_layers: bool, out_dir: str, store: str) -> None:
    import ctypes
    import gc

    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import _init_utils

    from vpa_lightning import VisionDPOModule

    torch.set_num_threads(1)
    # torch refuses sync_module_states for CPU tensors (a guard for NCCL); gloo broadcasts CPU tensors
    _init_utils._check_module_states_for_sync_module_states = lambda states: None
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    env = LightningEnvironment()
    env.set_world_size(2)
    env.set_global_rank(rank)
    layers = None
    if wrap_layers:  # one FSDP unit per transformer layer, as a user's --trainer.strategy.auto_wrap_policy would
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        layers = {LlamaDecoderLayer, CLIPEncoderLayer}
    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")] * 2, cluster_environment=env, auto_wrap_policy=layers)
    module = VisionDPOModule(model, lora=lora)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer._accelerator_connector.strategy = strategy  # Lightning's FSDPStrategy itself refuses CPU
    module.trainer = trainer
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    before = {"vm_hwm_mb": mb(_status_kb("VmHWM")), "vm_rss_mb": mb(_status_kb("VmRSS"))}
    with strategy.model_sharded_context():
        module.configure_model()
    record = {"rank": rank, "before_configure_model": before,
              "after_configure_model": {"vm_hwm_mb": mb(_status_kb("VmHWM")), "vm_rss_mb": mb(_status_kb("VmRSS"))},
              "policy_mb": _param_mb(module.model), "reference_mb": _param_mb(getattr(module, "reference", None)),
              "on_meta": all(p.is_meta for p in module.parameters()),
              "fsdp_kwargs_set": sorted(k for k in strategy.kwargs if k in ("sync_module_states", "param_init_fn"))}
    wrapped = FSDP(module, sharding_strategy=strategy.sharding_strategy, cpu_offload=strategy.cpu_offload,
                   device_id=torch.device("cpu"), **strategy.kwargs)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    flats = [m._flat_param for m in wrapped.modules() if isinstance(m, FSDP) and m._flat_param is not None]
    record["after_fsdp_wrap"] = {"vm_hwm_mb": mb(_status_kb("VmHWM")), "vm_rss_mb": mb(_status_kb("VmRSS")),
                                 "fsdp_units": len(flats),
                                 "local_shard_mb": round(sum(f.numel() * f.element_size() for f in flats) / 2**20, 1)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def _fsdp(args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    sys.path.insert(0, args.code)
    with tempfile.TemporaryDirectory(prefix="vpa-load-memory-") as tmp:
        mp.spawn(_fsdp_rank, args=(args.model, args.lora, args.wrap_layers, tmp, str(Path(tmp) / "store")), nprocs=2)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    return {"strategy": f"torch FSDP (FULL_SHARD, {'one unit per layer' if args.wrap_layers else 'one unit'}, the "
                        "FSDPStrategy kwargs the module set), 2 CPU processes, gloo",
            "ranks": ranks}


def _ddp(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="vpa-load-memory-") as tmp:
        tmp_path = Path(tmp)
        sys.path.insert(0, str(ROOT))
        from vpa_lightning.data import build
        from vpa_lightning.data.demo import make_demo

        ann = make_demo(tmp_path / "data", num_images=16, seed=0)
        build([str(ann)], tmp_path / "shards", val_fraction=0.0)
        probe = tmp_path / "probe"
        cmd = [
            sys.executable, "-m", "vpa_lightning.cli", "fit",
            f"--model.model_name_or_path={args.model}", f"--model.lora={str(args.lora).lower()}",
            f"--data.train_shards={tmp_path / 'shards'}", "--data.batch_size=1", "--data.groups_per_epoch=4",
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=load_memory.MemoryProbe", f"--trainer.callbacks.out_dir={probe}",
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.code, str(ROOT / "benchmarks")]), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=args.code, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            sys.exit(f"vpa fit failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))]
    return {"strategy": "ddp, 2 CPU processes, gloo", "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny:llava?text_hidden=1024&vision_hidden=256")
    parser.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose vpa_lightning the ranks run")
    parser.add_argument("--fsdp", action="store_true", help="torch FSDP on CPU (gloo) instead of DDP")
    parser.add_argument("--wrap-layers", action="store_true",
                        help="with --fsdp: one FSDP unit per transformer layer (an auto_wrap_policy) instead of one unit")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", args.code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out = {"model": args.model, "tuning": "lora" if args.lora else "full", "code": commit.stdout.strip() or args.code,
           **(_fsdp(args) if args.fsdp else _ddp(args)),
           "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
