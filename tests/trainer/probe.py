"""A callback for strategy tests: each rank writes what it trained on to ``PROBE_DIR/rank{r}.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    """Records, per rank, the world size, the steps and the sample keys of every training batch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.extend(batch.get("keys", []))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "global_step": trainer.global_step,
            "keys": self.keys,
            "pid": os.getpid(),
            # names DDP leaves out of its broadcasts and gradient buckets (the frozen reference)
            "ddp_ignored": sorted(getattr(trainer.strategy.model, "parameters_to_ignore", ())),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
