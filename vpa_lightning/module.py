"""``VisionDPOModule``: DPO-family preference optimisation of a vision-language model.

Per batch (see :mod:`vpa_lightning.data.datamodule` for its layout) the module

1. runs **one** :func:`~vpa_lightning.models.logps.group_logps` forward of the
   policy over all ``N`` responses of all groups,
2. gets the reference log-probs of the same ``N`` responses: from the on-disk
   cache (``reference_cache_dir``) when every response is there, otherwise with
   one no-grad forward of the reference model (and stores them); with
   ``ref_logps_from_data`` the values the dataset shipped, with no forward at all,
3. gathers the chosen/rejected log-probs of every pair of the batch (a group
   with K responses contributes all its shard pairs) and applies the loss;
   the training loss is the mean over pairs.

Checkpoints: under LoRA only the trainable weights (adapters, and the vision
modules with ``freeze_vision=False``) are saved; the frozen base is rebuilt from
``model_name_or_path`` (``strict_loading`` is off), so keep that path stable.

Model creation: ``__init__`` loads the processor only; the policy (and a full-fine-tuning
reference) is created in :meth:`~VisionDPOModule.configure_model`, inside the strategy's sharding
context, so DeepSpeed ZeRO-3 partitions it as it loads and FSDP shards it before training (with several
FSDP processes only rank 0 reads the weights; the others build on the meta device and receive them at
the wrap). Outside a ``Trainer`` the first use of ``module.model`` creates it.

Reference model: with LoRA it is the same network with the adapters disabled
(``PeftModel.disable_adapter()``), no second copy in memory; with full fine-tuning it is a frozen
second load of ``model_name_or_path``, a submodule that the strategy shards like the policy, never in
the optimizer and never in ``state_dict``/checkpoints (reloading rebuilds it from the source); none
for a reference-free loss or ``ref_logps_from_data``.

Metrics (torchmetrics ``MeanMetric`` over pairs), logged per step for
training and per epoch for validation/test, under exactly
``{stage}/loss``, ``{stage}/rewards/chosen``, ``{stage}/rewards/rejected``,
``{stage}/rewards/accuracies``, ``{stage}/rewards/margins``,
``{stage}/logps/chosen``, ``{stage}/logps/rejected`` (``stage`` = ``train``,
``val``, ``test``), plus ``train/skipped_samples`` (running count of samples the
data pipeline dropped).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import PurePath
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vpa_lightning.augment.pixels import corrupt_pixel_values
from vpa_lightning.losses import DPOLoss, LossBatch, PreferenceLoss
from vpa_lightning.models.loading import (
    DTYPES,
    TINY_PREFIX,
    EmptyParamInit,
    enable_activation_checkpointing,
    load_model,
    load_processor,
    load_vlm,
    match_rank0_layout,
    share_parameters,
)
from vpa_lightning.models.families import family_of
from vpa_lightning.models.logps import GroupBatch, GroupLogps, _unwrap_peft, group_logps, select_rows
from vpa_lightning.models.packed import PACKED_ATTENTION
from vpa_lightning.models.lora import apply_lora, default_lora_targets, language_and_vision_modules
from vpa_lightning.reference_cache import ReferenceCache

__all__ = ["METRIC_NAMES", "VisionDPOModule", "default_lora_targets", "load_vlm"]  # the last two re-exported

log = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
_STAGES = ("train", "val", "test")
#: Loss ``extra_inputs`` the module computes (see ``compute_loss``).
_EXTRA_INPUTS = {"policy_corrupted_chosen_logps", "ref_corrupted_chosen_logps"}
#: Optional :class:`~vpa_lightning.losses.LossBatch` inputs the module computes for a loss that needs them.
_NEEDS = {"token_logps", "ref_token_logps", "log_sum_sq_probs", "labels", "kl_logps", "scores"}
#: mDPO's corruption (arXiv 2406.11839, Sec. 3): a random crop keeping at most 20 % of the image.
MDPO_CORRUPTION: dict[str, Any] = {"name": "random_resized_crop", "scale": (0.01, 0.2)}

try:  # a lazy default shows up as ``class_path: ...DPOLoss`` in ``--print_config``
    from jsonargparse import lazy_instance

    _DEFAULT_LOSS: PreferenceLoss | None = lazy_instance(DPOLoss)
except ImportError:  # pragma: no cover - jsonargparse comes with lightning's CLI extra
    _DEFAULT_LOSS = None
class VisionDPOModule(pl.LightningModule):
    """Preference optimisation (DPO and relatives) of a vision-language model, with LoRA or full fine-tuning.

    Args:
        model_name_or_path: A local folder loadable with ``AutoModelForImageTextToText``
            and ``AutoProcessor``, or ``tiny:llava`` / ``tiny:qwen2_vl`` / ``tiny:idefics3``
            for a tiny random model (tests, demos), optionally with size options, e.g.
            ``tiny:llava?image_size=56&vision_hidden=64`` (see :mod:`vpa_lightning.models.tiny`).
        loss: The preference loss (``class_path`` in YAML), e.g.
            ``vpa_lightning.losses.DPOLoss`` (default, beta 0.1), ``IPOLoss``, ``HingeLoss``,
            ``RobustDPOLoss``, ``RPOLoss``, ``MDPOLoss`` (adds a pass of the chosen responses on a
            corrupted image, see ``image_corruption``), ``SimPOLoss`` / ``ORPOLoss`` (reference-free:
            no reference pass, cache or copy), ``BCOPairLoss``, ``APOZeroLoss``, ``APODownLoss``,
            ``EXOLoss``, ``NCALoss``, ``SPPOHardLoss``, ``KTOLoss`` (see ``--data.unpaired``),
            ``PlackettLuceLoss`` / ``LiPOLambdaLoss`` (listwise over each group), ``CombinedLoss``
            (weighted sum, e.g. MPO). The module computes what the loss declares it needs.
        lora: Train LoRA adapters (base weights frozen; the reference is the
            same network with adapters disabled) instead of all weights.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: PEFT ``target_modules`` (module-name suffixes); default:
            every ``nn.Linear`` of the language model (not the vision tower, projector or LM head).
        freeze_vision: Keep the vision tower and projector frozen. With ``lora`` and
            ``freeze_vision=False`` they are trained fully as PEFT ``modules_to_save``
            (their originals stay available for the reference).
        average_logps: Length-averaged response log-probs instead of summed ones in the loss and
            the logged log-probs. ``None`` (default): what the loss declares (summed for DPO and
            most losses; averaged for IPO, SimPO and ORPO); ``true`` / ``false`` overrides it for
            every part of the loss.
        reference_cache_dir: Directory of an on-disk cache of reference log-probs
            (keyed by sample key + response index); computed once, reused across
            epochs and runs. ``None`` = recompute every time.
        ref_logps_from_data: Use the reference log-probs the dataset shipped (kept per pair in the
            shards, e.g. MM-DPO's ``ref_win_logp``/``ref_rej_logp``) instead of running the reference
            model: no reference forward, and with full fine-tuning no reference copy is made. Every
            response of every batch must carry one (a sample without them is an error naming this
            flag and the sample, never a silent fall-back), and the model the shards record for
            them (``vpa-shard build --ref-logp-model``) must be ``ref_logps_model``. The summed
            values are used; a length-averaging loss divides them by this tokenisation's token
            count. Losses that need per-token, corrupted-image or KL reference log-probs (mDPO,
            KTO, ...) cannot use them.
        ref_logps_model: The model name the shipped log-probs must come from (compared with the
            shards' recorded ``model``, exactly or by its last path component). ``None``: the
            reference model, ``model_name_or_path``. Set it to accept log-probs of another model
            by name, or of shards that record none.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms, i.e. 1-D parameters).
        warmup_ratio: Fraction of the total optimizer steps with linear warm-up; then cosine decay to 0.
        adam_betas: AdamW betas.
        logps_method: ``"forward"`` or ``"hidden"`` (see :func:`~vpa_lightning.models.logps.group_logps`).
        gradient_checkpointing: Recompute activations in the backward pass (transformers'
            non-reentrant gradient checkpointing): less memory, about a third more compute.
        dtype: Weight dtype when loading: ``None`` (float32), ``"auto"`` (the checkpoint's),
            ``"bfloat16"``, ``"float16"`` or ``"float32"``. Log-softmax is always float32.
        seed: Initialisation seed of ``tiny:`` models.
        prefix_sharing: Run each group's image + prompt once and its K responses on top of the
            shared KV cache (the vision tower and the long prompt once per group instead of once per
            response; same log-probs up to float rounding). Needs ``logps_method="forward"`` and no
            gradient checkpointing (it relies on the KV cache).
        packed: Packed shared-prefix groups (:mod:`~vpa_lightning.models.packed`, arXiv 2410.20305), the
            default: each group is one segment ``[image + prompt | response 1 | ... | response K]`` under a
            mask that lets each response see the prefix and itself only, several groups per row; one
            forward, no KV cache, so it works with gradient checkpointing, FSDP and DeepSpeed. Same
            log-probs and gradients as the plain path up to float rounding (tested for every family).
            Needs an attention implementation that takes a mask (``sdpa``, ``eager``; ``flex_attention``
            on CUDA); a batch or model it cannot pack (flash-attention-2, the rows of a group on different
            images, rows without a shared prompt) runs the plain path, with one warning. Ignored with
            ``prefix_sharing``. ``false``: the plain path (one padded row per response).
        pack_tokens: With ``packed``: token budget of a packed row of the mask path (``None``: the longest group).
        packed_attention: With ``packed``: how the segments are kept apart. ``"auto"`` (default): variable-length
            flash attention on CUDA (:mod:`~vpa_lightning.models.varlen`: every group in one row, no mask, no
            padding, nothing compiled or planned per shape) when the model's attention is SDPA and the family's is
            causal within a segment (not Gemma 3 / PaliGemma's bidirectional blocks, Mllama's cross-attention rows,
            a sliding window shorter than a segment, attention dropout; those keep the mask, with one warning naming
            why), and the segment mask on CPU or under another attention implementation (eager, FlexAttention).
            ``"varlen"``: always (off CUDA a per-sequence SDPA reference, slow). ``"mask"``: never.
        image_corruption: How losses that need a corrupted image (mDPO) corrupt it: any
            :func:`~vpa_lightning.augment.build_augmentation` spec (``diffusion_noise``,
            ``{name: diffusion_noise, step: 800}``, a list, ...). ``None`` = mDPO's own corruption,
            a random crop keeping 1-20 % of the image, resized back. Drawn from torch's seeded
            RNG, the same corrupted image for policy and reference.
        reference_model_name_or_path: Where the frozen reference comes from: ``None`` (default) the starting
            policy, ``model_name_or_path`` (with LoRA: the same network with the adapters disabled, no copy); a
            local folder or ``tiny:`` spec of the same architecture loads a separate frozen reference from it,
            with LoRA too (``vpa rounds --reference initial``: a later round's policy against the original model).
        compile_layers: Compile each transformer block (the language model's decoder layers, the vision tower's
            encoder layers; the full-fine-tuning reference's too) with ``torch.compile``, dynamic shapes
            (:mod:`~vpa_lightning.models.compiled`): inductor fuses what a block runs besides its matrix products
            (norms, rotary embeddings, activations, residual adds, LoRA's scale-and-add). Identical blocks share one
            compiled graph; the first step compiles (tens of seconds), later steps do not recompile as packed
            lengths change. Same losses and gradients as eager up to float rounding. One device, DDP or FSDP;
            under DeepSpeed it stops at start-up.
        fsdp_rank0_load: Under Lightning's ``FSDPStrategy`` with more than one process, only global rank 0
            reads the weights (policy, full-fine-tuning reference); every other rank builds the same
            modules on the meta device (no weights on its host) and receives rank 0's weights, buffers
            and LoRA adapters when FSDP wraps the module. The module sets the strategy's
            ``sync_module_states=True`` and a ``param_init_fn`` that gives meta modules empty storage on
            the rank's device, unless the strategy was given its own. ``false`` (or the strategy's
            ``sync_module_states=False``): every rank loads the whole models, as under DDP.
    """

    def __init__(
        self,
        model_name_or_path: str,
        loss: PreferenceLoss | None = _DEFAULT_LOSS,
        lora: bool = True,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        freeze_vision: bool = True,
        average_logps: bool | None = None,
        reference_cache_dir: str | None = None,
        ref_logps_from_data: bool = False,
        ref_logps_model: str | None = None,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        logps_method: str = "forward",
        gradient_checkpointing: bool = False,
        dtype: str | None = None,
        seed: int = 0,
        prefix_sharing: bool = False,
        packed: bool = True,
        pack_tokens: int | None = None,
        packed_attention: str = "auto",
        image_corruption: str | dict[str, Any] | list[Any] | None = None,
        reference_model_name_or_path: str | None = None,
        fsdp_rank0_load: bool = True,
        compile_layers: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        # a fresh instance per module (the lazy default is shared); None also means DPOLoss().
        # A {"class_path", "init_args"} dict is what load_from_checkpoint passes back (see _loss_spec).
        if isinstance(loss, dict):
            loss = _loss_from_spec(loss)
        self.loss_fn = DPOLoss() if loss is None or loss is _DEFAULT_LOSS else loss
        if average_logps is not None:
            for part in self.loss_fn.modules():
                if isinstance(part, PreferenceLoss):
                    part.average_logps = bool(average_logps)
        self.hparams["loss"] = _loss_spec(self.loss_fn)
        unknown = (set(self.loss_fn.extra_inputs) - _EXTRA_INPUTS) | (set(self.loss_fn.required_inputs()) - _NEEDS)
        if unknown:
            raise ValueError(f"--model.loss: {type(self.loss_fn).__name__} needs inputs the module cannot compute: {sorted(unknown)}")
        if ref_logps_from_data:
            name, needs = type(self.loss_fn).__name__, self.loss_fn.required_inputs()
            if self.loss_fn.reference_free:
                raise ValueError(f"--model.ref_logps_from_data: {name} is reference-free, it uses no reference log-probs")
            lacking = (
                "per-token reference log-probs" if "ref_token_logps" in needs
                else "KL reference log-probs (mismatched pairs)" if "kl_logps" in needs
                else "reference log-probs of corrupted images" if self.loss_fn.extra_inputs
                else None
            )
            if lacking:
                raise ValueError(f"--model.ref_logps_from_data: {name} needs {lacking}, which datasets do not ship")
        self.ref_logps_from_data = ref_logps_from_data
        self.ref_logps_model = ref_logps_model
        self.image_corruption = MDPO_CORRUPTION if image_corruption is None else image_corruption
        self._corruption: list[nn.Module] = []  # built on first use; a list keeps it out of state_dict
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if logps_method not in ("forward", "hidden"):
            raise ValueError(f"logps_method must be 'forward' or 'hidden', got {logps_method!r}")
        if prefix_sharing and (logps_method != "forward" or gradient_checkpointing):
            raise ValueError(
                "--model.prefix_sharing needs --model.logps_method forward and no --model.gradient_checkpointing "
                "(it runs the responses on the prompt's KV cache)"
            )
        if pack_tokens is not None and pack_tokens < 1:
            raise ValueError(f"--model.pack_tokens must be >= 1, got {pack_tokens}")
        if packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"--model.packed_attention must be one of {PACKED_ATTENTION}, got {packed_attention!r}")
        self.packed_attention = packed_attention
        self.prefix_sharing = prefix_sharing
        self.packed = packed and not prefix_sharing  # two ways to share the prefix: prefix_sharing asked for explicitly
        self.pack_tokens = pack_tokens
        self.model_name_or_path = model_name_or_path
        self.reference_source = reference_model_name_or_path
        self.use_lora = lora
        self.average_logps = self.loss_fn.average_logps
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.adam_betas = tuple(adam_betas)
        self.logps_method = logps_method

        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"--model.dtype must be one of {DTYPES} or None, got {dtype!r}")
        self.lora_options = (lora_r, lora_alpha, lora_dropout, lora_target_modules)
        self.freeze_vision = freeze_vision
        self.gradient_checkpointing = gradient_checkpointing
        self.dtype_name = dtype
        self.seed = seed
        self.fsdp_rank0_load = fsdp_rank0_load
        self.compile_layers = compile_layers
        # The processor only: the weights are created in configure_model, inside the strategy's sharding
        # context (DeepSpeed ZeRO-3 partitions them as they are created, FSDP wraps them right after), not
        # here, where every rank would first hold a whole copy (two with a full-fine-tuning reference).
        self.processor = load_processor(model_name_or_path)
        # LoRA checkpoints keep the trainable weights only (see on_save_checkpoint); the frozen base
        # comes from model_name_or_path when the module is rebuilt, so loading is non-strict.
        self.strict_loading = not lora
        self._ds_config: list[Any] = []  # keeps transformers' ZeRO-3 config alive (it holds a weakref)
        # state_dict never carries the frozen reference; loading does not expect it (it comes from the source)
        self._register_state_dict_hook(_drop_reference_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_reference_keys)

        self.reference_cache: ReferenceCache | None = None
        if reference_cache_dir is not None and self.loss_fn.reference_free:
            log.info("%s is reference-free: --model.reference_cache_dir is not used", type(self.loss_fn).__name__)
            reference_cache_dir = None
        if reference_cache_dir is not None and ref_logps_from_data:
            log.info("--model.ref_logps_from_data: the shipped reference log-probs are used, --model.reference_cache_dir is not")
            reference_cache_dir = None
        self.reference_cache_dir = reference_cache_dir
        self.metrics = nn.ModuleDict(
            {f"{stage}_": nn.ModuleDict({_key(n): MeanMetric() for n in METRIC_NAMES}) for stage in _STAGES}
        )
        self._skipped_total = 0
        self._fit_batches = self._epoch_batches = self._fit_epochs = 0

    # -- model creation --------------------------------------------------------------------
    def configure_model(self) -> None:
        """Create the policy and, for full fine-tuning with a reference-based loss, the frozen reference.

        Lightning calls this inside the strategy's contexts (``Trainer`` before ``fit``/``validate``/...,
        and ``load_from_checkpoint``): under DeepSpeed ZeRO-3 every parameter is partitioned as it is
        created (``zero.Init``; transformers loads the checkpoint into the partitions), under FSDP the
        module is wrapped and sharded right after. The reference is a submodule like the policy, so the
        strategy shards it the same way (FSDP flat parameters, ZeRO-3 partitions and gather hooks), while
        it stays frozen (``requires_grad=False``, so never in the optimizer), in eval mode, out of the
        ``state_dict`` (checkpoints rebuild it from ``model_name_or_path``) and out of DDP's broadcasts.
        With LoRA the reference is the same network with the adapters disabled; a reference-free loss
        has none. Under FSDP with several processes only global rank 0 loads the weights; the other ranks
        build on the meta device and get rank 0's tensors at the wrap (``fsdp_rank0_load``). Idempotent.
        Outside a ``Trainer`` the first use of :attr:`model` calls it, and the reference is created on its
        first use (``vpa export``/``vpa eval`` never load it).
        """
        fresh = None
        if self.compile_layers:
            self._check_compile_strategy()
        if "model" not in self._modules:  # Lightning calls the hook for every trainer entry point
            self._zero3_loading()
            empty = self._fsdp_empty_load()
            # adapters included in the layout check: they are broadcast from rank 0 too, not re-drawn
            model = _built_on_every_rank(empty, "policy", lambda: self._policy(bool(empty)))
            self.model = fresh = model.train()
        # without a Trainer (load_from_checkpoint for export or eval) the reference waits for its first use
        if self._trainer is not None:
            self._create_reference(fresh)
            self._ddp_settings()

    def _policy(self, empty: bool) -> nn.Module:
        model = load_model(self.model_name_or_path, seed=self.seed, dtype=self.dtype_name, empty=empty)
        _, vision = language_and_vision_modules(model)
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model)
            model.config.use_cache = False
        unused = set(family_of(model).unused_parameters(model)) if not self.freeze_vision else set()
        if self.use_lora:
            model = apply_lora(model, *self.lora_options, self.freeze_vision)
        elif self.freeze_vision:
            for name in vision:
                model.get_submodule(name).requires_grad_(False)
        if unused:
            # a trainable parameter that never gets a gradient fails DDP; it would never learn anyway
            frozen = [n for n, p in model.named_parameters() if _source_name(n) in unused and p.requires_grad]
            for name in frozen:
                model.get_parameter(name).requires_grad_(False)
            if frozen:
                log.info("freezing %d parameters the %s forward never uses (the vision tower past its feature layer, its "
                         "pooled-output norm and head): %s", len(frozen), family_of(model).name, ", ".join(frozen[:4])
                         + (", ..." if len(frozen) > 4 else ""))
        if self.compile_layers:
            self._compile(model, "policy")
        return model

    @staticmethod
    def _compile(model: nn.Module, what: str) -> None:
        from vpa_lightning.models.compiled import compile_blocks

        n = compile_blocks(model)
        if n == 0:
            warnings.warn(f"--model.compile_layers: the {what} has no transformer blocks transformers marks "
                          "(GradientCheckpointingLayer); it runs eager", stacklevel=2)
        else:
            log.info("--model.compile_layers: %d blocks of the %s compiled (the first step compiles)", n, what)

    def _check_compile_strategy(self) -> None:
        strategy = getattr(self._trainer, "strategy", None)
        names = {k.__name__ for k in type(strategy).__mro__} if strategy is not None else set()
        if names & {"DeepSpeedStrategy", "ModelParallelStrategy"}:
            raise ValueError(f"--model.compile_layers runs on one device, under DDP or FSDP, not under "
                             f"{type(strategy).__name__} (its wrapping of compiled blocks is untested); drop "
                             "--model.compile_layers or use DDP or FSDP")

    @property
    def _copies_reference(self) -> bool:
        """Full fine-tuning, or a reference of its own (``reference_model_name_or_path``), needs a reference copy,
        unless the loss is reference-free or the data ships the reference log-probs."""
        own = not self.use_lora or self.reference_source is not None
        return own and not self.loss_fn.reference_free and not self.ref_logps_from_data

    def _create_reference(self, fresh: nn.Module | None = None) -> None:
        """``fresh``: the policy when this ``configure_model`` call has just read it from the source."""
        if not self._copies_reference or self.reference is not None:
            return
        # loaded again from the source rather than deep-copied: a copy of a partitioned (ZeRO-3) or wrapped
        # module is not a second sharded module, and a rebuilt module's reference must be the source even
        # when the policy then loads a checkpoint
        self._zero3_loading()
        empty = self._fsdp_empty_load()
        # FSDP's rank 0 with a policy just read from the source: until the wrap the reference's parameters are
        # the policy's tensors (no second copy on the host); the wrap gives each its own flat parameter (or
        # device copy) before any step, and nothing writes to the policy in between
        share = empty is False and fresh is not None and self.reference_source is None and not self.use_lora

        def build() -> nn.Module:
            source = self.reference_source or self.model_name_or_path
            reference = load_model(source, seed=self.seed, dtype=self.dtype_name, empty=bool(empty) or share)
            if share:
                share_parameters(reference, fresh)
            if self.compile_layers:
                self._compile(reference, "reference")
            return reference

        reference = _built_on_every_rank(empty, "reference", build)
        self.reference_model = reference.eval().requires_grad_(False)
        self._ddp_params_and_buffers_to_ignore = [
            f"reference_model.{name}" for name, _ in (*reference.named_parameters(), *reference.named_buffers())
        ]

    def _ddp_settings(self) -> None:
        """Plain DDP over several processes (not FSDP, not DeepSpeed), set before the strategy wraps the module,
        unless the strategy was given them: no buffer broadcast at every forward (the module's buffers are
        constants, rotary frequencies and position ids, the same on every rank; the broadcast is a collective in
        each forward, validation's too, whose ranks may run one batch more or less than another), and
        ``find_unused_parameters`` only where it is needed: parameters the family's forward never uses are frozen
        (:meth:`~vpa_lightning.models.families.Family.unused_parameters`, tested on every tiny family), and a model of
        another family with trainable vision or base weights gets ``find_unused_parameters=True``, with one line
        saying why."""
        from vpa_lightning.models.tiny import TINY_FAMILIES

        if not self._plain_ddp():
            return
        kwargs = self.trainer.strategy._ddp_kwargs
        kwargs.setdefault("broadcast_buffers", False)
        if "find_unused_parameters" in kwargs:
            return
        model_type = getattr(_unwrap_peft(self.model).config, "model_type", None)
        trainable_base = any(p.requires_grad and "lora_" not in n for n, p in self.model.named_parameters())
        if trainable_base and model_type not in TINY_FAMILIES:
            kwargs["find_unused_parameters"] = True
            log.info("DDP: find_unused_parameters=True: %s (model_type %r) trains weights outside LoRA adapters and vpa "
                     "does not know which of them its forward leaves unused (a little slower per step; freeze them "
                     "or pass the strategy's own find_unused_parameters to choose)", type(_unwrap_peft(self.model)).__name__,
                     model_type)

    def _zero3_loading(self) -> None:
        """Under DeepSpeed ZeRO-3, tell transformers (``HfDeepSpeedConfig``, held while the module lives)
        so that ``from_pretrained`` loads the weights into the partitions instead of whole tensors."""
        strategy = getattr(self._trainer, "strategy", None)
        if not getattr(strategy, "zero_stage_3", False) or self._ds_config:
            return
        from transformers.integrations import HfDeepSpeedConfig

        self._ds_config.append(HfDeepSpeedConfig(strategy.config))

    def _fsdp_empty_load(self) -> bool | None:
        """``None`` unless only rank 0 loads (Lightning's FSDPStrategy, several processes, ``fsdp_rank0_load``);
        then whether this rank builds on the meta device (every rank but global rank 0, the source of FSDP's
        ``sync_module_states`` broadcast). Sets the two FSDP arguments that make the wrap fill the empty
        ranks, on every rank, unless the strategy has its own."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = getattr(self._trainer, "strategy", None)
        if not self.fsdp_rank0_load or not isinstance(strategy, FSDPStrategy) or strategy.world_size < 2:
            return None
        if strategy.kwargs.get("sync_module_states") is False:
            if not getattr(self, "_told_no_sync", False):
                log.info("FSDP sync_module_states=False: every rank loads the whole model (--model.fsdp_rank0_load needs it)")
                self._told_no_sync = True
            return None
        strategy.kwargs["sync_module_states"] = True
        strategy.kwargs.setdefault("param_init_fn", EmptyParamInit(strategy.root_device))
        return strategy.global_rank != 0

    @property
    def model(self) -> nn.Module:
        """The policy (created by :meth:`configure_model` on first use outside a ``Trainer``)."""
        if "model" not in self._modules:
            try:
                self.configure_model()
            except AttributeError as exc:  # nn.Module.__getattr__ would hide it behind "no attribute 'model'"
                raise RuntimeError(f"creating the model of {self.model_name_or_path!r} failed: {exc}") from exc
        return self._modules["model"]

    @property
    def reference(self) -> nn.Module | None:
        """The frozen full-fine-tuning reference, or ``None`` (LoRA, reference-free loss, not yet created)."""
        return self._modules.get("reference_model")

    def train(self, mode: bool = True) -> VisionDPOModule:
        """Lightning switches the whole module to train mode; the reference stays in eval (no dropout)."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    @property
    def logps_options(self) -> dict[str, Any]:
        """Keyword arguments of every :func:`~vpa_lightning.models.logps.group_logps` call of the module."""
        return {"method": self.logps_method, "share_prefix": self.prefix_sharing, "pack": "auto" if self.packed else False,
                "pack_tokens": self.pack_tokens, "pack_attention": self.packed_attention}

    def forward_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens one forward over ``batch`` runs (each group's prefix once when packed or prefix-shared)."""
        inputs: GroupBatch = batch["inputs"]
        total = int(inputs.model_inputs["attention_mask"].sum())
        if self.packed or self.prefix_sharing:
            sizes = torch.tensor(inputs.group_sizes, device=inputs.prompt_lengths.device)
            first = torch.cumsum(sizes, 0) - sizes
            total -= int((inputs.prompt_lengths[first] * (sizes - 1)).sum())
        return total

    # -- reference -----------------------------------------------------------------------
    def _cache(self, max_length: int | None) -> ReferenceCache | None:
        if self.reference_cache_dir is None:
            return None
        fingerprint = {
            "model": self.reference_source or self.model_name_or_path,
            "seed": self.hparams.get("seed") if self.model_name_or_path.startswith(TINY_PREFIX) else None,
            "max_length": max_length,
            "method": self.logps_method,
            "dtype": self.hparams.get("dtype"),
        }
        if self.reference_cache is None or self.reference_cache.fingerprint != fingerprint:
            self.reference_cache = ReferenceCache(self.reference_cache_dir, fingerprint)
        return self.reference_cache

    def reference_logps(self, inputs: GroupBatch, **kwargs: bool) -> GroupLogps:
        """Reference log-probs of every row (no grad; eval mode, so no dropout); ``kwargs`` go to
        :func:`~vpa_lightning.models.logps.group_logps` (``token_logps``)."""
        if self.loss_fn.reference_free:
            raise RuntimeError(f"{type(self.loss_fn).__name__} is reference-free: no reference forward")
        if self.use_lora and self.reference_source is None:
            model, was_training = self.model, self.model.training
            model.eval()
            try:
                with torch.no_grad(), model.disable_adapter():
                    return self._logps(model, inputs, **kwargs)
            finally:
                model.train(was_training)
        if self.reference is None:  # outside a Trainer: created on first use, where the policy is
            self._create_reference()
            self.reference.to(next(self.model.parameters()).device)
        reference = self.reference
        with torch.no_grad():
            return self._logps(reference, inputs, **kwargs)

    def _logps(self, model: nn.Module, inputs: GroupBatch, **kwargs: bool) -> GroupLogps:
        return group_logps(model, inputs, **self.logps_options, **kwargs)

    def shipped_reference(self, batch: dict[str, Any]) -> Tensor:
        """``[N]`` reference log-probs (summed) of every row as the shards shipped them
        (``ref_logps_from_data``), after checking that every row has one and that they come from
        ``ref_logps_model``."""
        values = batch.get("data_ref_logps")
        inputs: GroupBatch = batch["inputs"]
        if values is None:
            raise ValueError("--model.ref_logps_from_data: the batch carries no shipped reference log-probs (data_ref_logps)")
        missing = torch.isnan(values).nonzero().flatten().tolist()
        if missing:
            row = missing[0]
            key = batch["keys"][int(inputs.group_index[row])]
            raise ValueError(
                f"--model.ref_logps_from_data: sample {key!r} response {int(batch['response_index'][row])} has no shipped "
                f"reference log-prob ({len(missing)} of {len(values)} rows of this batch lack one); build shards from data "
                "that ships them (e.g. MM-DPO's ref_win_logp/ref_rej_logp) or turn the flag off"
            )
        expected = self.ref_logps_model or self.model_name_or_path
        for row, recorded in enumerate(batch["data_ref_model"]):
            if recorded is None and self.ref_logps_model is not None:
                continue  # the user vouches for shards that record no model
            if recorded is None or not _same_model(recorded, expected):
                key = batch["keys"][int(inputs.group_index[row])]
                raise ValueError(
                    f"--model.ref_logps_from_data: sample {key!r} ships reference log-probs of model {recorded!r}, but the "
                    f"reference model is {expected!r}; set --model.ref_logps_model {recorded or 'NAME'} to use them anyway"
                    + ("" if recorded else " (rebuild with vpa-shard build --ref-logp-model NAME to record it)")
                )
        return values.to(self.device)

    def _reference_sums(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        inputs: GroupBatch = batch["inputs"]
        cache = self._cache(batch.get("max_length"))
        if cache is not None:
            keys = [batch["keys"][g] for g in inputs.group_index.tolist()]
            indices = batch["response_index"].tolist()
            hit = cache.lookup(keys, indices, batch["response_sha"])
            if hit is not None:
                return hit[0].to(self.device), hit[1].to(self.device)
        ref = self.reference_logps(inputs)
        if cache is not None:
            cache.store(keys, indices, batch["response_sha"], ref.sum_logps, ref.n_tokens)
        return ref.sum_logps, ref.n_tokens

    # -- loss --------------------------------------------------------------------------------
    def _values(self, sums: Tensor, n_tokens: Tensor) -> Tensor:
        """Per-row log-probs as the loss uses them (summed or length-averaged)."""
        return self.loss_fn.row_values(sums, n_tokens)

    def corrupted_chosen_batch(self, inputs: GroupBatch, chosen: Tensor) -> tuple[GroupBatch, Tensor]:
        """``(sub-batch, index)``: each distinct chosen row once, its image corrupted by
        ``image_corruption``; ``index[i]`` is pair ``i``'s row in the sub-batch."""
        if not self._corruption:
            from vpa_lightning.augment import build_augmentation

            self._corruption.append(build_augmentation(self.image_corruption))
        rows, index = torch.unique(chosen, return_inverse=True)
        sub = select_rows(inputs, rows)
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from the seeded global RNG: reproducible runs
        sub.model_inputs = corrupt_pixel_values(sub.model_inputs, self.processor, self._corruption[0], seed=seed)
        return sub, index

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The loss of a batch (``loss``, with gradient), its per-unit ``losses``, and per-pair
        rewards and log-probs. Computes exactly what the loss declares it needs: no reference
        work at all for a reference-free loss."""
        inputs: GroupBatch = batch["inputs"]
        chosen, rejected = batch["chosen"], batch["rejected"]
        loss_fn = self.loss_fn
        needs = loss_fn.required_inputs()
        extra: dict[str, Tensor] = {}
        corrupted = (
            self.corrupted_chosen_batch(inputs, chosen) if "policy_corrupted_chosen_logps" in loss_fn.extra_inputs else None
        )
        kl_inputs: GroupBatch | None = batch.get("kl_inputs") if "kl_logps" in needs else None
        # reference first (no grad, cached or adapters off), so no mode switch happens while the graph is alive
        ref_sums = ref_tokens = kl_ref = None
        if self.ref_logps_from_data:  # checked in __init__: a loss that needs only the summed values
            ref_sums = self.shipped_reference(batch)
        elif not loss_fn.reference_free:
            if "ref_token_logps" in needs:  # per-token values are not cached
                ref = self.reference_logps(inputs, token_logps=True)
                ref_sums, ref_tokens = ref.sum_logps, ref.token_logps
            else:
                ref_sums, _ = self._reference_sums(batch)
            if corrupted is not None:
                # corrupted images are drawn per step, so these are never cached
                sub, index = corrupted
                ref_bad = self.reference_logps(sub)
                extra["ref_corrupted_chosen_logps"] = self._values(ref_bad.sum_logps, ref_bad.n_tokens)[index]
            if kl_inputs is not None:
                kl_ref = self.reference_logps(kl_inputs).sum_logps
        kl_policy = None
        if kl_inputs is not None:
            with torch.no_grad():  # KTO's reference point is detached
                kl_policy = self._logps(self.model, kl_inputs).sum_logps
        policy = self._logps(
            self.model, inputs, token_logps="token_logps" in needs, sq_probs="log_sum_sq_probs" in needs
        )
        if corrupted is not None:
            pol_bad = self._logps(self.model, sub)
            extra["policy_corrupted_chosen_logps"] = self._values(pol_bad.sum_logps, pol_bad.n_tokens)[index]
        device = policy.sum_logps.device
        lb = LossBatch(
            policy_logps=policy.sum_logps,
            n_tokens=policy.n_tokens,
            ref_logps=None if ref_sums is None else ref_sums.to(device),
            chosen=chosen,
            rejected=rejected,
            row_group=policy.group_index.to(device),
            pair_group=batch.get("pair_group"),
            probability=batch.get("probability"),
            margin=batch.get("margin"),
            scores=batch.get("response_score"),
            strength=batch.get("response_strength"),
            labels=batch.get("response_label"),
            token_logps=policy.token_logps,
            ref_token_logps=ref_tokens,
            log_sum_sq_probs=policy.log_sum_sq_probs,
            kl_policy_logps=kl_policy,
            kl_ref_logps=kl_ref,
            extra=extra,
        )
        out = loss_fn.batch_loss(lb)
        return {
            "loss": out.loss,
            "losses": out.losses,
            "chosen_rewards": out.chosen_rewards,
            "rejected_rewards": out.rejected_rewards,
            "chosen_logps": out.chosen_logps,
            "rejected_logps": out.rejected_logps,
        }

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor | None:
        if batch.get("inputs") is None or batch["chosen"].numel() == 0:
            return None  # every group of the batch was skipped
        out = self.compute_loss(batch)
        loss = out["loss"]
        values = {
            "loss": loss.detach(),
            "rewards/chosen": out["chosen_rewards"],
            "rewards/rejected": out["rejected_rewards"],
            "rewards/accuracies": (out["chosen_rewards"] > out["rejected_rewards"]).float(),
            "rewards/margins": out["chosen_rewards"] - out["rejected_rewards"],
            "logps/chosen": out["chosen_logps"],
            "logps/rejected": out["rejected_logps"],
        }
        train = stage == "train"
        n_groups = len(batch["keys"])
        metrics = self.metrics[f"{stage}_"]
        if metrics[_key("loss")].device != loss.device:  # DeepSpeed ZeRO-3 never moves the module: states stay on the host
            metrics.to(loss.device)
        for name, value in values.items():
            metric = metrics[_key(name)]
            # forward: updates the epoch state and computes the batch value; the loss weighs by pairs
            metric(value, out["chosen_rewards"].numel()) if name == "loss" else metric(value)
            self.log(
                f"{stage}/{name}",
                metric,
                on_step=train,
                on_epoch=not train,
                prog_bar=name in ("loss", "rewards/accuracies"),
                batch_size=n_groups,
            )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        self._skipped_total += len(batch.get("skipped", ()))
        self.log("train/skipped_samples", float(self._skipped_total), on_step=True, on_epoch=False, batch_size=1)
        loss = self._shared_step(batch, "train")
        if loss is not None:
            self._epoch_batches += 1
            self._fit_batches += 1
        elif self._plain_ddp():
            # every group of this batch was skipped on this rank: under DDP the other ranks' backward waits for this
            # rank's gradients, so it takes part with zero ones (a loss of 0 through every trainable parameter)
            loss = sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)
        return loss

    def _plain_ddp(self) -> bool:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = getattr(self._trainer, "strategy", None)
        return (isinstance(strategy, DDPStrategy) and strategy.world_size > 1
                and not any(k.__name__ == "DeepSpeedStrategy" for k in type(strategy).__mro__))

    def on_fit_start(self) -> None:
        # The frozen reference is in eval mode by design (no dropout); Lightning's warning about modules in eval
        # mode is silenced for exactly that count, so a policy module left in eval mode still warns.
        idle = [n for n, m in self.named_modules() if not m.training]
        if idle and all(n == "reference_model" or n.startswith("reference_model.") for n in idle):
            warnings.filterwarnings("ignore", message=rf"Found {len(idle)} module\(s\) in eval mode at the start of training")

    # -- a run that trained on nothing fails ---------------------------------------------------
    def on_train_start(self) -> None:
        self._fit_batches = self._fit_epochs = 0

    def on_train_epoch_start(self) -> None:
        self._epoch_batches = 0

    def on_train_epoch_end(self) -> None:
        self._fit_epochs += 1
        # The tail of an epoch resumed from a mid-epoch checkpoint may legitimately be empty;
        # any other epoch without a single usable batch means the data yields nothing (and with
        # max_steps and no max_epochs Lightning would loop over empty epochs forever).
        if self._total(self._epoch_batches) == 0 and not (self._fit_epochs == 1 and self.trainer.ckpt_path):
            self._no_training(f"training epoch {self.current_epoch}")

    def on_train_end(self) -> None:
        if self._total(self._fit_batches) == 0 and not self.trainer.ckpt_path:
            self._no_training("the fit")

    def _total(self, count: int) -> int:
        """``count`` summed over all ranks (each rank reads its own part of the shards)."""
        return int(self.trainer.strategy.reduce(torch.tensor(float(count), device=self.device), reduce_op="sum").item())

    def _no_training(self, what: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        shards = getattr(dm, "train_shards", None)
        skipped = getattr(dm, "skipped", None)
        from vpa_lightning.errors import NothingTrainedError

        raise NothingTrainedError(
            f"{what} ran 0 training steps: no usable training sample was read"
            + (f" from --data.train_shards {shards!r}" if shards is not None else "")
            + (f" (skipped in this process: {skipped}; the warnings name each sample)" if skipped else "")
            + ". Nothing was trained and no checkpoint is written."
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Per-pair implicit rewards: ``keys``, ``pair_group``, ``chosen``/``rejected`` rows, rewards, log-probs."""
        if batch.get("inputs") is None:
            return {"keys": []}
        out = self.compute_loss(batch)
        return {
            "keys": batch["keys"],
            "pair_group": batch["pair_group"].cpu(),
            "chosen": batch["chosen"].cpu(),
            "rejected": batch["rejected"].cpu(),
            **{k: v.detach().cpu() for k, v in out.items()},
        }

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the full-fine-tuning reference (rebuilt from the source on load) and, under LoRA, the frozen
        base weights from the checkpoint (adapters and trainable modules stay).

        Except in FSDP's sharded checkpoints: torch's distributed checkpoint loads a state dict only whole
        (Lightning asks it for every key the wrapped module has, the reference's too), so a sharded
        checkpoint without them could not be resumed. There the reference's shards stay; they hold the
        source's values, as it never trains."""
        state = checkpoint.get("state_dict")
        if state is None:  # DeepSpeed saves the module through its engine
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "_state_dict_type", None) != "sharded":
            for key in [k for k in state if k.startswith("reference_model.")]:
                del state[key]
        if not self.use_lora:
            return
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith("model.") and k not in trainable]:
            del state[key]

    # -- optimisation ------------------------------------------------------------------------
    def _total_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        estimated = trainer.estimated_stepping_batches
        if math.isfinite(estimated) and estimated > 0:  # Lightning gives max_steps (-1) for unsized data
            return int(estimated)
        datamodule = getattr(trainer, "datamodule", None)
        groups = getattr(datamodule, "num_train_groups", None)
        if groups and trainer.max_epochs and trainer.max_epochs > 0:
            per_epoch = math.ceil(groups / (datamodule.batch_size * max(trainer.world_size, 1)))
            return max(math.ceil(per_epoch * trainer.max_epochs / trainer.accumulate_grad_batches), 1)
        raise ValueError("cannot tell the number of training steps for the LR schedule: set trainer.max_steps")

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.learning_rate, betas=self.adam_betas
        )
        total = self._total_steps()
        warmup = int(self.warmup_ratio * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _source_name(name: str) -> str:
    """A parameter's name in the transformers model, through PEFT's wrapper and ``modules_to_save`` copies."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


def _built_on_every_rank(empty: bool | None, what: str, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``; under rank-0 loading (``empty`` not ``None``) every rank then joins the layout check,
    also after its own failure, so a rank that fails makes all fail instead of leaving them waiting."""
    if empty is None:
        return build()
    try:
        model, error = build(), None
    except Exception as exc:  # reported through the collective, then raised on every rank
        model, error = None, exc
    match_rank0_layout(model, what, error)
    return model


def _drop_reference_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the frozen reference is rebuilt from the source, never saved. Inside FSDP the
    root's own hook still needs the keys; ``on_save_checkpoint`` drops them from the checkpoint there."""
    if "_fsdp_wrapped_module" in prefix:
        return
    for key in [k for k in state_dict if k.startswith(prefix + "reference_model.")]:
        del state_dict[key]


def _ignore_missing_reference_keys(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: the reference's keys are absent by design; strict loading still
    checks every other key."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if "reference_model." not in k]


def _loss_spec(loss: PreferenceLoss) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a loss, from its constructor arguments stored as attributes
    (those of its base classes too, for ``**kwargs`` options; nested losses as specs)."""
    import inspect

    # skip a jsonargparse lazy-instance subclass, if any
    klass = next(
        k for k in type(loss).__mro__ if not k.__name__.startswith("LazyInstance") and "jsonargparse" not in k.__module__
    )
    names: list[str] = ["self"]
    for k in klass.__mro__:  # a class whose __init__ takes **kwargs passes its base's options on
        if not issubclass(k, PreferenceLoss):
            break
        params = inspect.signature(k.__init__).parameters.values()
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    init_args = {}
    for name in names[1:]:
        if hasattr(loss, name):
            value = getattr(loss, name)
            if isinstance(value, nn.ModuleList):
                value = [_loss_spec(part) for part in value]
            init_args[name] = value
    return {"class_path": f"{klass.__module__}.{klass.__qualname__}", "init_args": init_args}


def _loss_from_spec(spec: dict[str, Any]) -> PreferenceLoss:
    import importlib

    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    init_args = {
        k: [_loss_from_spec(v) for v in value] if isinstance(value, list) and value and isinstance(value[0], dict) else value
        for k, value in spec.get("init_args", {}).items()
    }
    loss = cls(**init_args)
    if not isinstance(loss, PreferenceLoss):
        raise TypeError(f"{spec['class_path']} is not a PreferenceLoss")
    return loss


def _same_model(recorded: str, expected: str) -> bool:
    """Whether a recorded model name is ``expected``: equal, or equal last path components
    (``llava-v1.5-13b`` is ``/models/llava-v1.5-13b/``)."""
    return recorded == expected or PurePath(recorded.rstrip("/")).name == PurePath(expected.rstrip("/")).name


def _key(name: str) -> str:
    return name.replace("/", "_")  # ModuleDict keys cannot contain "."; keep them readable
