"""Lightning's own ``FSDPStrategy`` on CPU processes over gloo, for tests: ``vpa fit --trainer.strategy
tests.trainer.cpu_fsdp.CPUFSDPStrategy --trainer.accelerator cpu --trainer.devices 2``.

Lightning refuses ``FSDPStrategy`` with a CPU accelerator (the check is on the exact type, so a subclass
passes); it wraps with ``device_id=root_device.index``, ``None`` for the CPU, where torch's FSDP looks for
an accelerator (here: the CPU is the device); and torch refuses ``sync_module_states`` for CPU tensors (a
guard for NCCL, which broadcasts GPU tensors; gloo broadcasts CPU tensors). Those three are lifted, in
this process only; everything else is
Lightning's: ``configure_model`` in its contexts, the wrap with the strategy's kwargs, the optimizer,
full-state-dict checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU (gloo); records, per rank, what ``configure_model`` left before the wrap."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(process_group_backend="gloo", **kwargs)
        self.out_dir = Path(out_dir)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import _init_utils
        from torch.distributed.fsdp import fully_sharded_data_parallel as fsdp_module

        _init_utils._check_module_states_for_sync_module_states = lambda states: None
        handle = _init_utils._init_device_handle
        fsdp_module._init_device_handle = lambda state, module, ignored, device_id: handle(
            state, module, ignored, torch.device("cpu") if device_id is None else device_id
        )
        tensors = [*model.parameters(), *model.buffers()]
        record = {
            "rank": self.global_rank,
            "on_meta": sum(t.is_meta for t in tensors), "tensors": len(tensors),
            "kwargs": sorted(k for k in self.kwargs if k in ("sync_module_states", "param_init_fn")),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"loaded{self.global_rank}.json").write_text(json.dumps(record))
        return super()._setup_model(model)


class FullParamsProbe(Callback):
    """At the end of training, each rank's full (gathered) parameters, as float64 sums per name."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            named = (*pl_module.named_parameters(), *pl_module.named_buffers())
            sums = {n.replace("_fsdp_wrapped_module.", ""): t.detach().double().sum().item() for n, t in named}
        (self.out_dir / f"trained{trainer.global_rank}.json").write_text(json.dumps(sums))
