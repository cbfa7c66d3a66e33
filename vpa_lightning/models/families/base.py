"""The :class:`Family` base: the generic behaviour, which subclasses override per family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Family", "assistant_message"]

#: Stands for the response when rendering a chat template, to find what the template writes after it.
_SENTINEL = "\ue000vpa-response\ue001"


def assistant_message(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class Family:
    """Quirks of one VLM family; the base class is the generic behaviour.

    Attributes:
        name: Short name (used in messages and the README's table).
        model_types: ``config.model_type`` values of the family's models.
        processor_classes: Class names of the family's processors.
        response_fill: Value of each 2-D per-token processor output (shaped like
            ``input_ids``) over response tokens; default 0 (a text token for
            ``mm_token_type_ids`` and Gemma-3-style ``token_type_ids``).
        dropped_inputs: Processor outputs that are not model inputs (never passed to the model).
        nested_images: The processor takes one list of images per text, even for one image.
        needs_chat_template: The prompt comes from the processor's chat template (a checkpoint
            without one cannot be trained); ``False`` for families with a fixed prompt format.
        first_position: Position id of a sequence's first token (PaliGemma counts from 1).
        image_inputs: Model inputs with one entry per image (not per row).
        pixel_values_per_row: ``pixel_values`` has one entry per row (``[N, images, ...]``, Idefics3,
            Mllama) rather than one per image, and so do the image features (``pooler_output``).
        final_logit_softcap: The model's forward soft-caps the logits with the text config's
            ``final_logit_softcapping`` (the ``hidden`` log-prob method re-applies it); Gemma 3's
            ``ForConditionalGeneration`` does not, although its text config has one.
        unused_vision_modules: Submodules of the vision tower that the VLM's forward never runs (Gemma 3 and
            PaliGemma take SigLIP's hidden states, not its attention-pooling ``head``); see
            :meth:`unused_parameters`.
        bidirectional_blocks: Tokens the model lets attend to each other both ways, from its
            ``token_type_ids``: ``"image"`` = each run of ``token_type_ids == 1`` (Gemma 3's images),
            ``"prefix"`` = every ``token_type_ids == 0`` token (PaliGemma's image + prompt); ``None``:
            causal only. Packed groups (:mod:`~vpa_lightning.models.packed`) rebuild it per segment.
        video_model_types: The ``model_type`` s of the family that take video input (see :meth:`takes_video`);
            empty: none does, and a sample with a video stops the run (:meth:`check_video`).
        video_processor_classes: Class names of their processors.
        video_inputs: Model inputs with one entry per video (not per row).
        videos_one_tensor: The processor takes a batch's videos as one ``[videos, frames, ...]`` tensor, so they need
            one frame count: every video is sampled to exactly ``video_max_frames`` frames (:meth:`video_sampling`),
            the fixed count these families' papers sample.
    """

    name: str = "generic"
    model_types: tuple[str, ...] = ()
    processor_classes: tuple[str, ...] = ()
    response_fill: Mapping[str, int] = {}
    dropped_inputs: tuple[str, ...] = ()
    nested_images: bool = False
    needs_chat_template: bool = True
    first_position: int = 0
    final_logit_softcap: bool = True
    image_inputs: tuple[str, ...] = ("image_sizes", "image_grid_thw")
    pixel_values_per_row: bool = False
    bidirectional_blocks: str | None = None
    unused_vision_modules: tuple[str, ...] = ()
    video_model_types: tuple[str, ...] = ()
    video_processor_classes: tuple[str, ...] = ()
    videos_one_tensor: bool = False
    video_inputs: tuple[str, ...] = ("video_grid_thw", "second_per_grid_ts")

    # -- text ------------------------------------------------------------------------------
    def prompt_text(self, processor: Any, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt as the model sees it before its answer: the chat template with the generation prompt."""
        return processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def response_text(
        self,
        processor: Any,
        messages: Sequence[dict[str, Any]],
        prompt: str,
        response: str,
        score_trailing_newline: bool = False,
    ) -> str:
        """What the chat template writes after ``prompt`` for the assistant turn ``response``, up to and
        including its end-of-turn token (and the whitespace after it with ``score_trailing_newline``).

        It is the template's own text (its spacing, e.g. Idefics3's ``"Assistant: There"``, and its
        end-of-turn token, e.g. Gemma 3's ``<end_of_turn>``), so prompt + response tokenise to what
        ``apply_chat_template([..., assistant], tokenize=True)`` gives. A template that writes no special
        token after the answer (LLaVA-1.5's) gets the tokenizer's EOS, which the model must learn to emit.
        """
        tokenizer = processor.tokenizer
        render = processor.apply_chat_template
        marked = render([*messages, assistant_message(_SENTINEL)], tokenize=False)
        end = marked[marked.index(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in marked else ""
        full = render([*messages, assistant_message(response)], tokenize=False)
        if full.startswith(prompt) and full.endswith(end):
            body = full[len(prompt) : len(full) - len(end)]
        else:  # the generation prompt differs from the assistant turn's header (LLaVA-OneVision)
            body = response
        keep = end if score_trailing_newline else end.rstrip()
        if not self._has_special_token(tokenizer, keep):
            body, keep = body.rstrip() if not score_trailing_newline else body, keep + (tokenizer.eos_token or "")
        return body + keep

    @staticmethod
    def _has_special_token(tokenizer: Any, text: str) -> bool:
        if not text:
            return False
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
        return any(i in special for i in tokenizer(text, add_special_tokens=False)["input_ids"])

    def processor_kwargs(self, processor: Any, prompts: Sequence[str]) -> dict[str, Any]:
        """Extra processor arguments for these prompts: no second BOS when the template wrote one
        (the rule of transformers' own ``apply_chat_template(tokenize=True)``)."""
        bos = getattr(processor.tokenizer, "bos_token", None)
        if bos and prompts and all(p.startswith(bos) for p in prompts):
            return {"add_special_tokens": False}
        return {}

    def encode(
        self, processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]],
        videos: Sequence[Sequence[Any]] | None = None, video_max_pixels: int | None = None,
    ) -> dict[str, Any]:
        """Processor outputs (``return_tensors="pt"``, padded) of ``prompts[i]`` with ``images[i]``
        (0..N images per prompt; a batch may mix text-only, one- and several-image prompts), less
        :attr:`dropped_inputs`; with ``videos[i]`` (0..N videos per prompt) too, through
        :meth:`video_arguments`."""
        rows = [list(r) for r in images]
        kwargs = self.processor_kwargs(processor, prompts)
        if videos is not None and any(videos):
            kwargs.update(self.video_arguments(processor, [v for row in videos for v in row], video_max_pixels))
        out = processor(
            text=list(prompts), images=self.images_argument(rows) if any(rows) else None,
            return_tensors="pt", padding=True, **kwargs,
        )
        return {k: v for k, v in out.items() if k not in self.dropped_inputs}

    # -- videos ----------------------------------------------------------------------------
    def takes_video(self, obj: Any) -> bool:
        """Whether ``obj`` (a processor, or a model, PEFT-wrapped or not) takes video input here."""
        inner = obj.get_base_model() if hasattr(obj, "get_base_model") else obj
        model_type = getattr(getattr(inner, "config", None), "model_type", None)
        if model_type is not None:
            return model_type in self.video_model_types
        return type(obj).__name__ in self.video_processor_classes

    def video_sampling(self, sampling: Any) -> Any:
        """``sampling`` (a :class:`~vpa_lightning.data.video.VideoSampling`) as this family decodes videos: unchanged,
        or for :attr:`videos_one_tensor` families exactly ``max_frames`` frames per video (``exact_frames``)."""
        if not self.videos_one_tensor or sampling is None or sampling.exact_frames:
            return sampling
        if sampling.max_frames is None:
            raise ValueError(f"{self.name} samples every video to one frame count: set video_max_frames "
                             "(--data.video_max_frames / --video-max-frames), it cannot be null")
        from dataclasses import replace

        return replace(sampling, exact_frames=True)

    def check_video(self, obj: Any, what: str = "the data has videos",
                    fix: str = "Use one of them (--model.model_name_or_path), or shards without videos") -> None:
        """Raise :class:`~vpa_lightning.errors.VideoUnsupportedError`, naming the families that take video,
        unless ``obj`` (processor or model) takes video input. ``what``: the videos met; ``fix``: what the user
        can do, in the command's own flags (the default is the trainer's)."""
        if self.takes_video(obj):
            return
        from vpa_lightning.errors import VideoUnsupportedError

        from . import video_model_types

        name = getattr(getattr(obj, "config", None), "model_type", None) or type(obj).__name__
        raise VideoUnsupportedError(
            f"{what}, and {name} ({self.name} family) takes no video input in vpa; the model types that do: "
            f"{', '.join(video_model_types())}. {fix}"
        )

    def video_arguments(self, processor: Any, videos: Sequence[Any], max_pixels: int | None) -> dict[str, Any]:
        """Processor arguments for ``videos`` (:class:`~vpa_lightning.models.video.VideoClip`, every video of the
        batch in order); ``max_pixels`` (pixels per frame at most, ``None``: the processor's own) mapped to the
        processor's video size argument. The frames go as arrays with their metadata, sampling off: the processor
        never loads or samples anything itself. Here: the :attr:`videos_one_tensor` families' arguments (their
        processors resize every frame to the checkpoint's fixed size, so ``max_pixels`` is not passed on)."""
        if not self.videos_one_tensor:
            raise NotImplementedError(f"{self.name}: no video input")
        counts = sorted({v.num_frames for v in videos})
        if len(counts) > 1:  # the data module samples one count for these families: a caller that did not
            raise ValueError(
                f"{self.name} takes the videos of a batch as one tensor: they need one frame count, got {counts} "
                "(decode them with the family's video_sampling: exactly video_max_frames each)"
            )
        return {"videos": [v.frames for v in videos],
                "videos_kwargs": {"do_sample_frames": False, "video_metadata": [v.metadata() for v in videos]}}

    def video_pixel_rows(self, processor: Any, inputs: Mapping[str, Any], video_counts: Any) -> Any:
        """``[N]`` rows of ``pixel_values_videos`` per row: each video's ``t x h x w`` patches where the processor
        gives ``video_grid_thw`` (flat patches, Qwen2-VL), else one entry per video."""
        import torch

        grid = inputs.get("video_grid_thw")
        per_video = grid.prod(dim=-1) if grid is not None else torch.ones(int(video_counts.sum()), dtype=torch.long)
        if inputs.get("pixel_values_videos") is not None and int(per_video.sum()) != inputs["pixel_values_videos"].shape[0]:
            raise ValueError(
                f"{self.name}: pixel_values_videos has {inputs['pixel_values_videos'].shape[0]} rows, expected "
                f"{int(per_video.sum())} for {int(video_counts.sum())} videos"
            )
        owner = torch.repeat_interleave(torch.arange(len(video_counts)), video_counts)
        return torch.zeros(len(video_counts), dtype=torch.long).index_add(0, owner, per_video.long())

    # -- images ----------------------------------------------------------------------------
    def images_argument(self, images: list[list[Any]]) -> Any:
        """The ``images=`` argument of the processor for one list of images per text."""
        if self.nested_images or any(len(row) != 1 for row in images):
            return images
        return [row[0] for row in images]

    def pixel_rows_per_image(self, processor: Any, inputs: Mapping[str, Any], input_ids: Any, image_counts: Any) -> Any:
        """``[images]`` rows of ``pixel_values`` per image: one by default."""
        import torch

        return torch.ones(int(image_counts.sum()), dtype=torch.long)

    def pixel_rows(self, processor: Any, inputs: Mapping[str, Any], input_ids: Any, image_counts: Any) -> Any:
        """``[N]`` rows of ``pixel_values`` per row, or ``None`` when ``pixel_values`` is laid out per row."""
        import torch

        pixel_values = inputs.get("pixel_values")
        if pixel_values is None or self.pixel_values_per_row:
            return None
        per_image = self.pixel_rows_per_image(processor, inputs, input_ids, image_counts)
        if int(per_image.sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"{self.name}: pixel_values has {pixel_values.shape[0]} rows, expected {int(per_image.sum())} "
                f"for {int(image_counts.sum())} images"
            )
        owner = torch.repeat_interleave(torch.arange(len(image_counts)), image_counts)
        return torch.zeros(len(image_counts), dtype=torch.long).index_add(0, owner, per_image)

    def unused_parameters(self, model: Any) -> list[str]:
        """Names (as ``model.named_parameters()`` gives them) of the parameters ``model``'s forward can never use,
        so never get a gradient: DDP fails on them when they are trainable. A VLM that takes its image features
        from the vision tower's hidden states (``config.vision_feature_layer``: LLaVA, LLaVA-NeXT,
        LLaVA-OneVision) never runs the tower's layers after the deepest feature layer (LLaVA-1.5 reads the
        penultimate one, -2: its last layer is unused), nor its ``post_layernorm`` and pooling ``head``, which make
        the pooled output; plus :attr:`unused_vision_modules`. Tested on every tiny family: with these frozen,
        every other parameter gets a gradient (``tests/models/test_families.py``)."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        tower_name = next((n for n, _ in inner.named_modules() if n.rsplit(".", 1)[-1] == "vision_tower"), None)
        if tower_name is None:
            return []
        tower = inner.get_submodule(tower_name)
        unused = list(self.unused_vision_modules)
        feature_layer = getattr(inner.config, "vision_feature_layer", None)
        if feature_layer is not None:
            unused += ["post_layernorm", "head"]
            layers = getattr(getattr(tower, "encoder", None), "layers", None)
            if layers is not None:
                n = len(layers)
                wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
                # hidden_states[0] is the embeddings, hidden_states[i] the output of layer i - 1
                deepest = max(f if f >= 0 else n + 1 + f for f in wanted)
                unused += [f"encoder.layers.{i}" for i in range(deepest, n)]
        names = []
        for module in unused:
            if module.split(".")[0] in dict(tower.named_children()):
                names += [f"{tower_name}.{module}.{p}" for p, _ in tower.get_submodule(module).named_parameters()]
        return names

    def __repr__(self) -> str:
        return f"<Family {self.name}>"
