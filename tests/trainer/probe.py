"""A callback for strategy tests: each rank writes what it trained on to ``PROBE_DIR/rank{r}.json``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    """Records, per rank, the world size, the steps and the sample keys of every training batch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.keys: list[str] = []
        self.epochs: dict[int, list[str]] = {}  # training keys per epoch
        self.val_keys: list[str] = []  # keys of the last validation pass that was not the sanity check
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.extend(batch.get("keys", []))
        self.epochs.setdefault(trainer.current_epoch, []).extend(batch.get("keys", []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()) if loss is not None else float("nan"))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_keys = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.val_keys.extend(batch.get("keys", []))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "global_step": trainer.global_step,
            "keys": self.keys,
            "epochs": self.epochs,
            "val_keys": self.val_keys,
            "losses": self.losses,
            # the trainable weights at the end, bit for bit
            "params_sha": hashlib.sha256(b"".join(
                p.detach().cpu().contiguous().numpy().tobytes() for _, p in sorted(pl_module.named_parameters())
                if p.requires_grad)).hexdigest(),
            "pid": os.getpid(),
            # names DDP leaves out of its broadcasts and gradient buckets (the frozen reference)
            "ddp_ignored": sorted(getattr(trainer.strategy.model, "parameters_to_ignore", ())),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class StopAt(Callback):
    """Stops the run after ``steps`` optimizer steps, as a killed run would (its LR schedule still spans
    ``max_steps``); the default checkpoint is written as the epoch ends."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.steps
