"""Lightning callbacks of the trainer.

``ThroughputLog`` (on by default in ``vpa fit``) logs tokens/s, pairs/s, samples/s and, on CUDA,
MFU every ``log_every_n_steps``. ``GarbageCollection`` (on by default too) runs Python's cyclic garbage
collector between steps on a schedule instead of whenever allocation counts trip it mid-step. ``PreferenceReport`` measures the validation preference metrics of the policy right before
the first training step and again when training ends, and prints a before/after table; with an
``answer_scorer`` it also scores the policy's greedy answers to the validation prompts::

    trainer:
      callbacks:
        - class_path: vpa_lightning.callbacks.PreferenceReport
          init_args:
            answer_scorer: vpa_lightning.data.demo.answer_is_correct
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

__all__ = [
    "GREEDY_METRIC", "THROUGHPUT_METRICS", "EpochLine", "GarbageCollection", "PreferenceReport", "ThroughputLog", "flop_params", "flops_per_token", "format_report",
    "load_scorer", "peak_flops",
]

log = logging.getLogger(__name__)

#: Metrics over pairs (means), named as the module logs them.
PAIR_METRICS: tuple[str, ...] = (
    "val/rewards/accuracies",
    "val/rewards/margins",
    "val/loss",
    "val/logps/chosen",
    "val/logps/rejected",
)
#: Ranking metrics from the policy's own log-probs (reference-free): fraction of pairs whose chosen
#: response has the higher policy log-prob, and fraction of prompts whose best-rated response has
#: the highest policy log-prob among all of its responses.
RANKING_METRICS: tuple[str, ...] = ("val/logps/accuracies", "val/top1")
#: Fraction of validation prompts whose greedy answer the ``answer_scorer`` judges correct.
GREEDY_METRIC = "val/greedy/correct"


def load_scorer(path: str, flag: str = "answer_scorer") -> Callable[[str, str, str], bool]:
    """The function at import path ``path`` (``"package.module.function"``); errors name ``flag``."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{flag} must be an import path like 'package.module.function', got {path!r}")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{flag}={path!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"{flag}={path!r} is not callable")
    return fn


def format_report(before: dict[str, float], after: dict[str, float], title: str = "Preference report") -> str:
    """A plain-text ``metric | before | after`` table (metrics in ``before``'s order, then ``after``'s)."""
    names = list(before) + [n for n in after if n not in before]
    width = max([len("metric")] + [len(n) for n in names])

    def cell(values: dict[str, float], name: str) -> str:
        value = values.get(name)
        return "-" if value is None else f"{value:.4f}"

    lines = [title, f"{'metric':<{width}} | {'before':>10} | {'after':>10}", f"{'-' * width}-+-{'-' * 10}-+-{'-' * 10}"]
    lines += [f"{n:<{width}} | {cell(before, n):>10} | {cell(after, n):>10}" for n in names]
    return "\n".join(lines)


class PreferenceReport(Callback):
    """Validation metrics before training and after it, printed as a ``metric | before | after`` table.

    At ``on_train_start`` (model on its device, before the first optimizer step; after a resume
    that is the restored state) and at ``on_train_end`` the callback runs the module's
    :meth:`~vpa_lightning.module.VisionDPOModule.compute_loss` over the validation dataloader (no
    grad, eval mode, metrics not logged) and stores the means over all pairs in ``self.before`` and
    ``self.after``: ``val/rewards/accuracies``, ``val/rewards/margins``, ``val/loss``,
    ``val/logps/chosen``, ``val/logps/rejected`` (and with ``ranking`` also ``val/logps/accuracies``
    and ``val/top1``, see :data:`RANKING_METRICS`). Under LoRA the policy starts equal to the
    reference, so the "before" rewards are all 0: accuracy 0, margin 0, loss ``log 2`` for DPO.

    With an ``answer_scorer`` the policy also answers every validation prompt greedily (through
    the module's processor and chat template, as :func:`~vpa_lightning.models.generation.generate_answers`)
    and ``val/greedy/correct`` is the fraction that the scorer judges correct against the group's
    best-rated response (chosen in a pair, rejected in none; the strongest such). The answers are
    kept in ``self.answers_before`` / ``self.answers_after`` as ``(key, question, reference, answer)``.
    This needs the :class:`~vpa_lightning.data.datamodule.PreferenceDataModule` (it reads the
    decoded validation groups) and a model that fits ``generate`` on one device.

    With several processes the sums are reduced over all ranks; only rank 0 prints.

    Args:
        max_batches: Validation batches per pass (``None`` = the whole validation set).
        ranking: Also measure the reference-free ranking metrics (one more policy forward per batch).
        print_table: Print the table at the end of training (the numbers are stored either way).
        answer_scorer: Import path of ``scorer(question, answer, reference) -> bool``, e.g.
            ``vpa_lightning.data.demo.answer_is_correct`` for the demo set; ``None``: no greedy answers.
        max_new_tokens: Longest greedy answer, in tokens.
        show_answers: With ``answer_scorer`` and ``print_table``: print this many validation
            questions with their reference and the greedy answers before and after training.
    """

    def __init__(
        self,
        max_batches: int | None = None,
        ranking: bool = True,
        print_table: bool = True,
        answer_scorer: str | None = None,
        max_new_tokens: int = 32,
        show_answers: int = 3,
    ) -> None:
        super().__init__()
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if show_answers < 0:
            raise ValueError(f"show_answers must be >= 0, got {show_answers}")
        self.max_batches = max_batches
        self.ranking = ranking
        self.print_table = print_table
        self.scorer = load_scorer(answer_scorer) if answer_scorer is not None else None
        self.max_new_tokens = max_new_tokens
        self.show_answers = show_answers
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.answers_before: list[tuple[str, str, str, str]] = []
        self.answers_after: list[tuple[str, str, str, str]] = []

    # -- hooks -----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = self.measure(trainer, pl_module)
        if self.scorer is not None:
            self.answers_before = self.answer(trainer, pl_module, self.before)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after = self.measure(trainer, pl_module)
        if self.scorer is not None:
            self.answers_after = self.answer(trainer, pl_module, self.after)
        if self.print_table and trainer.is_global_zero and (self.before or self.after):
            print("\n" + format_report(self.before, self.after), flush=True)
            for (_, question, reference, old), (_, _, _, new) in list(zip(self.answers_before, self.answers_after))[: self.show_answers]:
                print(f"\nQ: {question}\n  reference: {reference}\n  before:    {old!r}\n  after:     {new!r}", flush=True)

    # -- measurement -----------------------------------------------------------------------
    def _val_loader(self, trainer: pl.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            loader = datamodule.val_dataloader()
        else:
            loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        return loader

    @torch.no_grad()
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """One pass over the validation data; ``{metric: mean}`` (empty without validation data)."""
        loader = self._val_loader(trainer)
        if loader is None:
            log.warning("PreferenceReport: no validation dataloader, nothing to report")
            return {}
        names = PAIR_METRICS + (RANKING_METRICS if self.ranking else ())
        sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # + pair count, group count
        was_training = pl_module.training
        pl_module.eval()
        try:
            for index, batch in enumerate(loader):
                if self.max_batches is not None and index >= self.max_batches:
                    break
                if batch.get("inputs") is None or batch["chosen"].numel() == 0:
                    continue
                batch = trainer.strategy.batch_to_device(batch)
                sums += self._batch_sums(pl_module, batch, len(names))
        finally:
            pl_module.train(was_training)
        sums = trainer.strategy.reduce(sums.to(pl_module.device), reduce_op="sum").double().cpu()
        pairs, groups = float(sums[-2]), float(sums[-1])
        if pairs == 0:
            return {}
        result = {name: float(sums[i]) / pairs for i, name in enumerate(PAIR_METRICS)}
        if self.ranking:
            result["val/logps/accuracies"] = float(sums[len(PAIR_METRICS)]) / pairs
            result["val/top1"] = float(sums[len(PAIR_METRICS) + 1]) / max(groups, 1.0)
        return result

    @torch.no_grad()
    def answer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, into: dict[str, float]) -> list[tuple[str, str, str, str]]:
        """Greedy answers to this rank's validation groups, scored into ``into[GREEDY_METRIC]``."""
        from vpa_lightning.models.generation import generate_answers

        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "dataset") or getattr(datamodule, "val_urls", None) is None:
            log.warning("PreferenceReport: answer_scorer needs a PreferenceDataModule with validation shards; no greedy answers")
            return []
        from vpa_lightning.models.families import family_of

        # video samples are answered by families that take video; any other skips them (training them stopped at
        # start-up already, see VideoUnsupportedError)
        takes_video = family_of(pl_module.processor).takes_video(pl_module.processor)
        rows = []  # (key, images, question, reference, image offsets, videos, video offsets)
        for example in datamodule.dataset(datamodule.val_urls, train=False):
            group = example.group
            if group.videos and not takes_video:
                continue
            rejected = {j for _, j in example.pairs}
            best = sorted(c for c, _ in example.pairs if c not in rejected)
            if best:
                rows.append((example.key, group.all_images, group.prompt, group.responses[best[0]], group.image_offsets,
                             group.all_videos, group.video_offsets))
            if self.max_batches is not None and len(rows) >= self.max_batches * datamodule.batch_size:
                break
        answers = (
            generate_answers(pl_module.model, pl_module.processor, [r[1] for r in rows], [r[2] for r in rows],
                             max_new_tokens=self.max_new_tokens, batch_size=max(datamodule.batch_size, 1),
                             offsets=[r[4] for r in rows], videos=[r[5] for r in rows],
                             video_offsets=[r[6] for r in rows],
                             video_max_pixels=getattr(datamodule, "video_max_pixels", None))
            if rows
            else []
        )
        correct = sum(bool(self.scorer(q, a, ref)) for (_, _, q, ref, *_), a in zip(rows, answers))
        sums = torch.tensor([float(correct), float(len(rows))], dtype=torch.float64, device=pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum").double().cpu()
        if sums[1] > 0:
            into[GREEDY_METRIC] = float(sums[0] / sums[1])
        return [(key, q, ref, a) for (key, _, q, ref, *_), a in zip(rows, answers)]

    def _batch_sums(self, pl_module: pl.LightningModule, batch: dict[str, Any], n_names: int) -> torch.Tensor:
        out = pl_module.compute_loss(batch)
        chosen_r, rejected_r = out["chosen_rewards"].float(), out["rejected_rewards"].float()
        row = [
            (chosen_r > rejected_r).float().sum(),
            (chosen_r - rejected_r).sum(),
            out["loss"].detach().float() * chosen_r.numel(),
            out["chosen_logps"].float().sum(),
            out["rejected_logps"].float().sum(),
        ]
        n_groups = 0
        if self.ranking:
            from vpa_lightning.models.logps import group_logps

            inputs = batch["inputs"]
            policy = group_logps(pl_module.model, inputs, **pl_module.logps_options)
            values = pl_module._values(policy.sum_logps, policy.n_tokens).float()
            chosen, rejected = batch["chosen"], batch["rejected"]
            row.append((values[chosen] > values[rejected]).float().sum())
            # best-rated row of a group: chosen in some pair and rejected in none
            top1 = 0
            group_index = inputs.group_index
            rejected_rows = set(rejected.tolist())
            for g in sorted(set(group_index[chosen].tolist())):
                best = [r for r in chosen.tolist() if int(group_index[r]) == g and r not in rejected_rows]
                if not best:
                    continue
                rows = (group_index == g).nonzero().flatten()
                top = int(rows[values[rows].argmax()])
                top1 += int(top in best)
                n_groups += 1
            row.append(torch.tensor(float(top1)))
        row = [torch.as_tensor(v, dtype=torch.float64).cpu() for v in row]
        row += [torch.tensor(float(chosen_r.numel()), dtype=torch.float64), torch.tensor(float(n_groups), dtype=torch.float64)]
        assert len(row) == n_names + 2
        return torch.stack(row)



#: What :class:`ThroughputLog` logs (``mfu`` and ``tflops_per_s`` only where the device's peak is known: CUDA).
THROUGHPUT_METRICS: tuple[str, ...] = (
    "train/throughput/tokens_per_s",
    "train/throughput/pairs_per_s",
    "train/throughput/samples_per_s",
    "train/throughput/tflops_per_s",
    "train/throughput/mfu",
)


#: Dense bf16/fp16 tensor-core peaks (FLOP/s, datasheets; first match of the lower-cased device name wins).
#: Lightning's own table names the H200 "h200 sxm1"/"nvl1", which torch never reports ("NVIDIA H200"), and
#: lists the 2:4-sparse figure, which would halve every MFU.
DENSE_HALF_PRECISION_PEAKS: tuple[tuple[str, float], ...] = (
    ("h200 nvl", 835e12),
    ("h200", 989.4e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989.4e12),
    ("a100", 312e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for matrix work in ``dtype``, or ``None`` where unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    if dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device).lower()
        for chip, peak in DENSE_HALF_PRECISION_PEAKS:
            if chip in name:
                return peak
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)


def flop_params(module: torch.nn.Module) -> tuple[int, int]:
    """``(N, N_trainable)`` of :func:`flops_per_token`: the parameters outside the input embeddings, counted
    whole where ZeRO-3 shards them (``ds_numel``). A frozen full-fine-tuning reference (``reference_model``)
    is left out: its forward is the formula's own reference term, not a second model's worth of FLOPs."""
    skip = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    reference = getattr(module, "reference_model", None)
    if isinstance(reference, torch.nn.Module):
        skip |= {id(p) for p in reference.parameters()}
    params = [p for p in module.parameters() if id(p) not in skip]
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    return sum(numel(p) for p in params), sum(numel(p) for p in params if p.requires_grad)


def flops_per_token(n_params: int, n_trainable: int, reference_free: bool = False) -> int:
    """Model FLOPs of one preference-training token: ``2 N`` policy forward, ``2 N`` backward to the
    activations, ``2 N_trainable`` weight gradients, ``2 N`` reference forward unless ``reference_free``
    (``N``: parameters outside the input embeddings; attention's ``T^2`` work left out, as in PaLM's MFU;
    recomputation under gradient checkpointing is not model work and is not counted)."""
    return 2 * n_params * (2 if reference_free else 3) + 2 * n_trainable


class EpochLine(Callback):
    """One line per epoch on stdout (epoch, step, loss and accuracy, seconds) when the progress bar is off, so a run
    whose output goes to a file or a CI log shows it is alive; silent when Lightning's progress bar shows.

    Args:
        metrics: Logged metrics to show when present (the first of them found; others are skipped).
    """

    def __init__(self, metrics: tuple[str, ...] = ("train/loss", "train/rewards/accuracies", "val/loss",
                                                    "val/rewards/accuracies")) -> None:
        super().__init__()
        self.metrics = tuple(metrics)
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        if trainer.progress_bar_callback is not None or trainer.global_rank != 0 or trainer.sanity_checking:
            return
        shown = trainer.callback_metrics
        parts = [f"{name} {float(shown[name]):.4f}" for name in self.metrics
                 if name in shown and getattr(shown[name], "numel", lambda: 1)() == 1]
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        print(f"epoch {trainer.current_epoch + 1}{total}  step {trainer.global_step}  " + "  ".join(parts)
              + f"  ({time.perf_counter() - self._start:.1f} s)", flush=True)


class GarbageCollection(Callback):
    """Python's cyclic garbage collector between optimizer steps, every ``every_n_steps``, never inside one.

    Left to itself the collector runs whenever allocation counts cross its thresholds, in the middle of a forward
    or backward, and a full collection walks every object the process holds (the model's modules, parameters,
    the data pipeline): a pause of up to a quarter of a second per step was measured on the first steps of a
    7B run on an H200 (``benchmarks/results/gpu_check_h200_run3.json``). At train start this collects once, moves
    every object alive then (model, optimizer, data module) to the permanent generation (``gc.freeze``), where
    later collections no longer walk them, and turns automatic collection off; every ``every_n_steps`` steps it
    collects what the steps left in between; at the end (or on an exception) it restores the collector as found.
    Reference cycles a step creates (autograd graphs kept by an exception, ...) wait at most ``every_n_steps``.

    Args:
        every_n_steps: Training steps between two collections (>= 1).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"--trainer.callbacks.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._was_enabled: bool | None = None
        self._steps = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import gc

        self._was_enabled = gc.isenabled()
        self._steps = 0
        gc.collect()
        gc.freeze()
        gc.disable()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        import gc

        self._steps += 1
        if self._steps % self.every_n_steps == 0:
            gc.collect()

    def _restore(self) -> None:
        import gc

        if self._was_enabled is None:
            return
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()


class ThroughputLog(Callback):
    """Training throughput, logged on the steps the trainer logs (``log_every_n_steps``).

    Rates are over the steps since the previous log (wall time, the GPU synchronised first), summed
    over all ranks: ``train/throughput/tokens_per_s`` (non-padding tokens of the batch as built: prompt,
    image tokens and response of every response's sequence), ``pairs_per_s`` (preference pairs),
    ``samples_per_s`` (groups: one image + prompt with its responses). On CUDA also
    ``tflops_per_s`` and ``mfu``: model FLOPs per second per device over the device's peak for the
    training precision. Model FLOPs per token are counted as in :func:`flops_per_token`; the peak is
    the GPU's dense bf16/fp16 datasheet figure (:func:`peak_flops`), or ``peak_tflops``. When the module runs fewer tokens than the batch holds (packed groups,
    prefix sharing: the shared prefix runs once), its ``forward_tokens(batch)`` gives the tokens FLOPs
    are counted on, so MFU stays a hardware figure while tokens/s counts the data.

    Args:
        log_mfu: Also log ``tflops_per_s`` / ``mfu`` where the peak is known (CUDA).
        peak_tflops: The device's peak in TFLOP/s for MFU, for a device :func:`peak_flops` does not
            know (any device, CPU included); default: the known GPU's dense figure.
    """

    def __init__(self, log_mfu: bool = True, peak_tflops: float | None = None) -> None:
        super().__init__()
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"--trainer.callbacks.peak_tflops must be > 0, got {peak_tflops}")
        self.log_mfu = log_mfu
        self.peak_tflops = peak_tflops
        self._counts = torch.zeros(4, dtype=torch.float64)  # tokens, pairs, samples, flop tokens
        self._t0: float | None = None
        self._params: tuple[int, int] | None = None
        self._peak: float | None = None
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._counts.zero_()
        self._t0 = time.perf_counter()
        self._params = flop_params(pl_module)
        self._peak = None
        if self.log_mfu and self.peak_tflops is not None:
            self._peak = self.peak_tflops * 1e12
        elif self.log_mfu and pl_module.device.type == "cuda":
            from lightning.fabric.utilities.throughput import _plugin_to_compute_dtype

            self._peak = peak_flops(pl_module.device, _plugin_to_compute_dtype(trainer.precision_plugin))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        import time

        if self._t0 is None or not isinstance(batch, dict):
            return
        inputs = batch.get("inputs")
        if inputs is not None:
            mask = inputs.model_inputs.get("attention_mask")
            tokens = float(mask.sum()) if mask is not None and mask.dim() == 2 else float(inputs.labels.numel())
            counter = getattr(pl_module, "forward_tokens", None)
            flop_tokens = float(counter(batch)) if callable(counter) else tokens
            self._counts += torch.tensor([tokens, float(batch["chosen"].numel()), float(len(batch.get("keys", ()))), flop_tokens], dtype=torch.float64)
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        counts = trainer.strategy.reduce(self._counts.to(pl_module.device), reduce_op="sum").double().cpu()
        tokens, pairs, samples, flop_tokens = (float(c) for c in counts)
        metrics = {
            "train/throughput/tokens_per_s": tokens / elapsed,
            "train/throughput/pairs_per_s": pairs / elapsed,
            "train/throughput/samples_per_s": samples / elapsed,
        }
        if self._peak and self._params is not None:
            n_all, n_trainable = self._params
            reference_free = bool(getattr(getattr(pl_module, "loss_fn", None), "reference_free", False))
            per_token = flops_per_token(n_all, n_trainable, reference_free)
            flops_per_device = per_token * flop_tokens / max(trainer.world_size, 1) / elapsed
            metrics["train/throughput/tflops_per_s"] = flops_per_device / 1e12
            metrics["train/throughput/mfu"] = flops_per_device / self._peak
        self.last = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)
        self._counts.zero_()
        self._t0 = now
