"""Tiny, randomly initialised, *real* transformers VLMs for tests and demos.

Nothing is downloaded: each family's model is built from a config (about 0.1 M
parameters: 2 vision + 2 text layers, hidden size 32, vocabulary 512), and its
processor gets a byte-level BPE tokenizer trained here, in a fraction of a
second, on a short built-in corpus (plus the special tokens the family's
processor and model need) and a small chat template.

Supported families (``TINY_FAMILIES``):

``llava``
    ``LlavaForConditionalGeneration`` = tiny CLIP vision tower + tiny Llama,
    ``LlavaProcessor`` with ``CLIPImageProcessor`` (28 px images, 4 image tokens).
``qwen2_vl``
    ``Qwen2VLForConditionalGeneration`` (M-RoPE, dynamic resolution),
    ``Qwen2VLProcessor`` with ``Qwen2VLImageProcessor`` (up to 56x56 px, the
    number of image tokens follows the aspect ratio).
``idefics3``
    ``Idefics3ForConditionalGeneration`` = tiny SigLIP-style vision tower + pixel
    shuffle + tiny Llama, ``Idefics3Processor`` with ``Idefics3ImageProcessor``
    (56 px, 4 image tokens, image splitting off by default).

Sizes: ``image_size`` (side of the processed image in pixels), ``vision_hidden`` and ``text_hidden`` (widths of
the vision tower and the language model) can be raised from the defaults above, e.g. for a demo whose answers must be
read off the image (see :data:`TINY_OPTIONS`). They are also reachable from a model spec string,
``tiny:llava?image_size=56&vision_hidden=64`` (:func:`parse_tiny_spec`), wherever
``model_name_or_path`` takes ``tiny:<family>``. Without options every family is built exactly
as before (same config, same weights for a given seed).

Image processors use the backend that ``AutoImageProcessor`` picks in the
current environment (torchvision if installed, else PIL), so a saved folder
loads back with identical preprocessing. ``qwen2_vl`` needs torchvision:
transformers 5 requires a video processor in ``Qwen2VLProcessor`` and video
processors are torchvision-only (so do ``llava_onevision`` and ``llava_next_video``, whose processors hold
a video processor too).

Example::

    model, processor = build_tiny_vlm("qwen2_vl", out_dir="/tmp/tiny-qwen")
    # later, with the normal loading code:
    AutoModelForImageTextToText.from_pretrained("/tmp/tiny-qwen")
    AutoProcessor.from_pretrained("/tmp/tiny-qwen")
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["TINY_FAMILIES", "TINY_OPTIONS", "build_tiny_tokenizer", "build_tiny_vlm", "chat_template", "parse_tiny_spec"]

TINY_FAMILIES: tuple[str, ...] = (
    "llava",
    "qwen2_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "mistral3",
    "mllama",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "llava_next",
    "llava_onevision",
    "llava_next_video",
)

#: Size options of :func:`build_tiny_vlm` and their defaults per family. ``image_size`` must be a
#: multiple of the family's step (llava: the patch, 14; qwen2_vl and idefics3: patch x merge, 28);
#: ``vision_hidden`` a multiple of 2 (the vision tower's 2 attention heads); ``text_hidden`` (width
#: of the language model) a multiple of 32 (4 heads whose size splits into Qwen2-VL's 3 M-RoPE
#: sections). llava also takes
#: ``vision_init_factor``, the CLIP ``initializer_factor`` of its vision tower (default 10:
#: large random weights; 1 gives features from which colour and count are easier to read).
TINY_OPTIONS: dict[str, dict[str, int]] = {
    "llava": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32, "vision_init_factor": 10},
    "qwen2_vl": {"image_size": 56, "vision_hidden": 32, "text_hidden": 32},
    "idefics3": {"image_size": 56, "vision_hidden": 32, "text_hidden": 32},
    "smolvlm": {"image_size": 56, "vision_hidden": 32, "text_hidden": 32},
    "gemma3": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32},
    "paligemma": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32},
    "mistral3": {"image_size": 56, "vision_hidden": 32, "text_hidden": 32},
    "mllama": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32},
    "qwen2_5_vl": {"image_size": 56, "vision_hidden": 32, "text_hidden": 32},
    "qwen3_vl": {"image_size": 64, "vision_hidden": 32, "text_hidden": 32},
    "internvl": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32},
    "llava_next": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32},
    "llava_onevision": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32},
    "llava_next_video": {"image_size": 28, "vision_hidden": 32, "text_hidden": 32},
}
_IMAGE_STEP = {
    "llava": 14, "qwen2_vl": 28, "idefics3": 28, "smolvlm": 28, "gemma3": 14, "paligemma": 14, "mistral3": 28,
    "mllama": 14, "qwen2_5_vl": 28, "qwen3_vl": 32, "internvl": 28, "llava_next": 14, "llava_onevision": 14,
    # a frame's patch grid is average-pooled with stride 2: an even number of patches per side
    "llava_next_video": 28,
}

# A short corpus: enough for the BPE to learn some merges; any text still encodes (byte-level).
_CORPUS = [
    "A photo of a cat sitting on a red sofa next to a window.",
    "The image shows two dogs playing with a ball in the park.",
    "There is a man riding a bicycle down a busy street.",
    "What is in the image? Describe the picture in detail.",
    "How many people are in this picture? There are three people.",
    "The sky is blue and the grass is green. A tree stands on the left.",
    "Is there a car in the image? No, there is no car in the image.",
    "A bowl of fruit with apples, bananas and oranges on a wooden table.",
    "The woman is holding an umbrella because it is raining.",
    "Answer the question using a single word or phrase. Yes. No. Two.",
    "The chart shows the number of visitors per month, highest in July.",
    "A white boat on a calm lake with mountains in the background.",
]

# Chat roles and turn end; "<|end|>" doubles as EOS.
_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
_END = "<|end|>"
_PAD = "<|pad|>"
_BOS = "<|begin|>"

#: What a ``{"type": "video"}`` part renders as in the templates of the families that take video (as their
#: published templates write it).
_VIDEO_PLACEHOLDER = {
    "qwen2_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|video_pad|><|vision_end|>",
}

_IMAGE_PLACEHOLDER = {
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
}

_FAMILY_SPECIAL_TOKENS = {
    "llava": ["<image>"],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
    "gemma3": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "paligemma": ["<image>"],
    "mistral3": ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"],
    "mllama": ["<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"],
    "qwen2_5_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "internvl": ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
    "llava_next": ["<image>", "[INST]", "[/INST]"],
    "llava_onevision": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
    "llava_next_video": ["<image>", "<video>"],
}
_FAMILY_SPECIAL_TOKENS["smolvlm"] = _FAMILY_SPECIAL_TOKENS["idefics3"] + ["<video>"]
_FAMILY_SPECIAL_TOKENS["qwen3_vl"] = _FAMILY_SPECIAL_TOKENS["qwen2_5_vl"]
#: Families whose real tokenizer prepends BOS (their templates write it too).
_ADDS_BOS = ("idefics3", "gemma3", "mistral3", "mllama", "llava_next", "llava_next_video")
#: Model-specific named special tokens the family's processor reads from its tokenizer.
_NAMED_TOKENS = {
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "internvl": {
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
}


def chat_template(image_placeholder: str, video_placeholder: str | None = None) -> str:
    """A minimal Jinja chat template.

    Renders ``<|role|>\\n`` + content + ``<|end|>\\n`` per message; content is a
    string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
    parts, an image part becoming ``image_placeholder``. With
    ``add_generation_prompt`` it ends with ``<|assistant|>\\n``, so a response is
    scored as ``response text + <|end|>``. With ``video_placeholder`` a ``{"type": "video"}`` part
    becomes it (Qwen2-VL's ``<|vision_start|><|video_pad|><|vision_end|>``).
    """
    video = "" if video_placeholder is None else "{% elif part['type'] == 'video' %}" + video_placeholder
    return (
        "{% for message in messages %}"
        "<|{{ message['role'] }}|>\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image_placeholder + video +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "<|end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )


def build_tiny_tokenizer(
    extra_special_tokens: list[str] | tuple[str, ...] = (),
    vocab_size: int = 512,
    *,
    add_bos: bool = False,
    named_tokens: dict[str, str] | None = None,
):
    """Train a byte-level BPE on the built-in corpus and wrap it as a transformers fast tokenizer.

    Args:
        extra_special_tokens: Special tokens to add (never split, never merged).
        vocab_size: Target vocabulary size of the BPE (special tokens included).
        add_bos: Prepend BOS when encoding with special tokens, as the Llama / Gemma / Mistral
            tokenizers do (their chat templates write BOS too: a processor must not add a second).
        named_tokens: Model-specific named special tokens (e.g. Gemma 3's ``{"boi_token": ...}``),
            readable as tokenizer attributes like ``tokenizer.boi_token``.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<|begin|>`` BOS, ``<|end|>`` EOS and ``<|pad|>`` PAD.
        It adds no BOS/EOS on its own (the chat template carries the structure).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [_PAD, _BOS, _END, *_ROLE_TOKENS]
    specials += [t for t in extra_special_tokens if t not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if add_bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single=f"{_BOS} $A", pair=f"{_BOS} $A $B", special_tokens=[(_BOS, tok.token_to_id(_BOS))]
        )
    extra: Any = [t for t in specials if t not in (_PAD, _BOS, _END)]
    if named_tokens:
        extra = {**{t: t for t in extra}, **named_tokens}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_END,
        pad_token=_PAD,
        extra_special_tokens=extra,
        padding_side="right",
        model_max_length=4096,
    )
    return hf


# Larger than the usual 0.02 so that the random models give peaked, input-dependent
# distributions: tests comparing log-probs then notice a wrong position or a lost image.
_INIT_RANGE = 0.2


def _image_processor_class(name: str):
    """``transformers.<name>`` (torchvision backend) if torchvision is installed, else ``<name>Pil``."""
    import transformers
    from transformers.utils import is_torchvision_available

    return getattr(transformers, name if is_torchvision_available() else name + "Pil")


def _llama_text_kwargs(tokenizer, hidden_size: int = 32) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        "initializer_range": _INIT_RANGE,
    }


def _build_llava(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32, vision_init_factor: int = 10):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    patch = 14
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        initializer_range=_INIT_RANGE,
        initializer_factor=float(vision_init_factor),
    )
    text = LlamaConfig(**_llama_text_kwargs(tokenizer, text_hidden))
    n_image_tokens = (image_size // patch) ** 2  # CLS dropped by the "default" strategy
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=chat_template(_IMAGE_PLACEHOLDER["llava"]),
    )
    return LlavaForConditionalGeneration(config), processor


def _build_qwen2_vl(tokenizer, image_size: int = 56, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        raise ImportError("the qwen2_vl tiny model needs torchvision (Qwen2VLProcessor requires a video processor)")

    hidden, heads = text_hidden, 4
    head_dim = hidden // heads
    text = dict(_llama_text_kwargs(tokenizer, hidden))
    half = head_dim // 2  # M-RoPE splits the rotary half of each head into temporal, height, width
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half // 2, half // 4, half // 4]}
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim
    vision = {
        "depth": 2,
        "embed_dim": vision_hidden,
        "hidden_size": hidden,  # output of the patch merger = text hidden size
        "mlp_ratio": 2,  # transformers 5 configs are strict dataclasses: int, not 2.0
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": _INIT_RANGE,
    }
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(
        size={"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    # transformers 5 will not build a Qwen2VLProcessor without a video processor, and video
    # processors need torchvision: this family therefore requires torchvision.
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template(_IMAGE_PLACEHOLDER["qwen2_vl"], _VIDEO_PLACEHOLDER["qwen2_vl"]),
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _build_idefics3(tokenizer, image_size: int = 56, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    patch, scale = 14, 2
    vision = Idefics3VisionConfig(**_vision_kwargs(image_size, vision_hidden, patch), initializer_range=_INIT_RANGE)
    text = LlamaConfig(**_llama_text_kwargs(tokenizer, text_hidden))
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    image_processor = _image_processor_class("Idefics3ImageProcessor")(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=((image_size // patch) ** 2) // (scale**2),
        chat_template=REAL_TEMPLATES["idefics3"],
    )
    return Idefics3ForConditionalGeneration(config), processor


# -- the families added for trainer fidelity: each gets (a tiny copy of the structure of) its real chat template --

#: Chat templates written after each family's published template (same turn markers, spacing,
#: BOS and end-of-turn tokens; system prompts and tool handling left out).
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)


def _content(image: str, video: str | None = None) -> str:
    out = _CONTENT.replace("IMAGE", image)
    if video is not None:
        out = out.replace("{% elif part['type'] == 'text' %}", "{% elif part['type'] == 'video' %}" + video + "{% elif part['type'] == 'text' %}")
    return out


REAL_TEMPLATES: dict[str, str] = {
    # Idefics3 / SmolVLM: "User:<image>What?<end_of_utterance>\nAssistant: There<end_of_utterance>\n"
    "idefics3": (
        "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
    # Gemma 3: BOS once, "model" turns, "<end_of_turn>\n" ends every turn
    "gemma3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
        "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Llama 3.2 Vision: header ids, "<|eot_id|>" ends turns
    "mllama": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['content'] is string %}{{ message['content'] | trim }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '<|image|>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
        "{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral Small 3.1: "[INST]...[/INST]answer</s>"
    "mistral3": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST]' }}" + _content("[IMG]") + "{{ '[/INST]' }}"
        "{% elif message['role'] == 'assistant' %}" + _content("") + "{{ eos_token }}{% endif %}{% endfor %}"
    ),
    # Qwen2.5-VL: default system prompt, "<|im_end|>\n" ends turns
    "qwen2_5_vl": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        + _content("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>") + "<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Qwen3-VL: no default system prompt
    "qwen3_vl": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n" + _content("<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # InternVL3 (-hf): Qwen2.5 turns, "<IMG_CONTEXT>\n" per image
    "internvl": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n" + _content("<IMG_CONTEXT>\n") + "<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # LLaVA-NeXT (Mistral): "[INST] <image>\nWhat? [/INST] There</s>"
    "llava_next": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}{{ ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + c['text'] }}{% endfor %}"
        "{{ eos_token }}{% endif %}{% endfor %}"
    ),
    # LLaVA-OneVision (Qwen2): "<|im_start|>user <image>\nWhat?<|im_end|>\n<|im_start|>assistant\n" (images, then videos,
    # then the text)
    "llava_onevision": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + c['text'] }}{% endfor %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # LLaVA-NeXT-Video-7B (Vicuna): "USER: <image>\n<video>\nWhat? ASSISTANT:", the answer "ASSISTANT: There " (images,
    # then videos, then the text; no end-of-turn token: the tokenizer's BOS starts the sequence, EOS ends the answer)
    "llava_next_video": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}


def _vision_kwargs(image_size: int, vision_hidden: int, patch: int = 14) -> dict:
    """The two-layer, two-head SigLIP-style tower that the SigLIP-based families share."""
    return dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )


def _siglip(image_size: int, vision_hidden: int, patch: int = 14):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**_vision_kwargs(image_size, vision_hidden, patch))


def _build_smolvlm(tokenizer, image_size: int = 56, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    patch, scale = 14, 2
    vision = SmolVLMVisionConfig(**_vision_kwargs(image_size, vision_hidden, patch), initializer_range=_INIT_RANGE)
    config = SmolVLMConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_llama_text_kwargs(tokenizer, text_hidden)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    image_processor = _image_processor_class("SmolVLMImageProcessor")(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=((image_size // patch) ** 2) // (scale**2),
        chat_template=REAL_TEMPLATES["idefics3"],
    )
    return SmolVLMForConditionalGeneration(config), processor


def _build_gemma3(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig

    n_tokens = (image_size // 14) ** 2
    text = Gemma3TextConfig(
        **{k: v for k, v in _llama_text_kwargs(tokenizer, text_hidden).items() if k != "tie_word_embeddings"},
        head_dim=text_hidden // 4,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip(image_size, vision_hidden),
        mm_tokens_per_image=n_tokens,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        initializer_range=_INIT_RANGE,
    )
    image_processor = _image_processor_class("Gemma3ImageProcessor")(
        size={"height": image_size, "width": image_size}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=n_tokens,
        chat_template=REAL_TEMPLATES["gemma3"],
    )
    return Gemma3ForConditionalGeneration(config), processor


def _build_paligemma(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    n_tokens = (image_size // 14) ** 2
    text = GemmaConfig(
        **{k: v for k, v in _llama_text_kwargs(tokenizer, text_hidden).items() if k != "tie_word_embeddings"},
        head_dim=text_hidden // 4,
    )
    vision = _siglip(image_size, vision_hidden)
    vision.projection_dim = text_hidden
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=text_hidden,
        hidden_size=text_hidden,
        vocab_size=len(tokenizer),
    )
    image_processor = _image_processor_class("SiglipImageProcessor")(
        size={"height": image_size, "width": image_size}
    )
    image_processor.image_seq_length = n_tokens
    # no chat template, as the published checkpoints: the family's prompt format applies
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return PaliGemmaForConditionalGeneration(config), processor


def _build_mistral3(tokenizer, image_size: int = 56, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralProcessor, PixtralVisionConfig

    patch, merge = 14, 2
    vision = PixtralVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2,
        num_attention_heads=2, head_dim=vision_hidden // 2, image_size=image_size, patch_size=patch,
        initializer_range=_INIT_RANGE,
    )
    text = MistralConfig(**_llama_text_kwargs(tokenizer, text_hidden), head_dim=text_hidden // 4)
    config = Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=merge, vision_feature_layer=-1,
    )
    image_processor = _image_processor_class("PixtralImageProcessor")(
        size={"longest_edge": image_size}, patch_size=patch
    )
    processor = PixtralProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, spatial_merge_size=merge,
        chat_template=REAL_TEMPLATES["mistral3"],
    )
    return Mistral3ForConditionalGeneration(config), processor


def _build_mllama(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    vision = MllamaVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=2, num_global_layers=1,
        attention_heads=2, image_size=image_size, patch_size=14, max_num_tiles=2,
        intermediate_layers_indices=[0], vision_output_dim=2 * vision_hidden,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], initializer_range=_INIT_RANGE,
    )
    kw = _llama_text_kwargs(tokenizer, text_hidden)
    text = MllamaTextConfig(**kw, cross_attention_layers=[1])
    text.num_hidden_layers = 2
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    image_processor = _image_processor_class("MllamaImageProcessor")(
        size={"height": image_size, "width": image_size}, max_image_tiles=2
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=REAL_TEMPLATES["mllama"])
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # the cross-attention gates start at 0 (image ignored): open them
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    return model, processor


def _qwen_processors(image_size: int, patch: int):
    from transformers import Qwen2VLVideoProcessor

    pixels = image_size * image_size
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch, temporal_patch_size=2, merge_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch, temporal_patch_size=2, merge_size=2
    )
    return image_processor, video_processor


def _qwen_text(tokenizer, hidden: int) -> dict[str, Any]:
    text = dict(_llama_text_kwargs(tokenizer, hidden))
    half = hidden // 4 // 2  # M-RoPE splits the rotary half of each head into temporal, height, width
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half // 2, half // 4, half // 4]}
    return text


def _qwen_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _build_qwen2_5_vl(tokenizer, image_size: int = 56, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = {
        "depth": 2, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_heads": 2,
        "out_hidden_size": text_hidden, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 56, "fullatt_block_indexes": [1], "initializer_range": _INIT_RANGE,
    }
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tokenizer, text_hidden), vision_config=vision, **_qwen_ids(tokenizer))
    image_processor, video_processor = _qwen_processors(image_size, 14)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=REAL_TEMPLATES["qwen2_5_vl"],
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _build_qwen3_vl(tokenizer, image_size: int = 64, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    vision = {
        "depth": 2, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_heads": 2,
        "out_hidden_size": text_hidden, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1], "initializer_range": _INIT_RANGE,
    }
    text = _qwen_text(tokenizer, text_hidden)
    text["head_dim"] = text_hidden // 4
    text["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tokenizer))
    image_processor, video_processor = _qwen_processors(image_size, 16)
    from transformers import Qwen3VLVideoProcessor

    pixels = image_size * image_size
    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels})
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=REAL_TEMPLATES["qwen3_vl"],
    )
    return Qwen3VLForConditionalGeneration(config), processor


def _build_internvl(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, InternVLVideoProcessor, Qwen2Config

    patch = 14
    n_tokens = ((image_size // patch) ** 2) // 4  # pixel shuffle, downsample 0.5
    vision = {
        "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": [image_size, image_size], "patch_size": [patch, patch],
        "initializer_range": _INIT_RANGE,
    }
    text = Qwen2Config(**_llama_text_kwargs(tokenizer, text_hidden))
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=n_tokens, tie_word_embeddings=False,
    )
    # crops: a 2x1 image becomes 2 tiles + 1 thumbnail (several pixel_values rows per image)
    image_processor = _image_processor_class("GotOcr2ImageProcessor")(
        size={"height": image_size, "width": image_size}, crop_to_patches=True, min_patches=1, max_patches=2,
    )
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=InternVLVideoProcessor(),
        image_seq_length=n_tokens, chat_template=REAL_TEMPLATES["internvl"],
    )
    return InternVLForConditionalGeneration(config), processor


def _build_llava_next(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, MistralConfig

    patch = 14
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch, initializer_range=_INIT_RANGE,
    )
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaNextConfig(
        vision_config=vision, text_config=MistralConfig(**_llama_text_kwargs(tokenizer, text_hidden)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=(image_size // patch) ** 2,
    )
    image_processor = _image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=REAL_TEMPLATES["llava_next"],
    )
    return LlavaNextForConditionalGeneration(config), processor


def _build_llava_onevision(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
    )

    patch = 14
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaOnevisionConfig(
        vision_config=_siglip(image_size, vision_hidden, patch), text_config=Qwen2Config(**_llama_text_kwargs(tokenizer, text_hidden)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    image_processor = _image_processor_class("LlavaOnevisionImageProcessor")(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints,
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size}),
        num_image_tokens=(image_size // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=REAL_TEMPLATES["llava_onevision"],
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def _build_llava_next_video(tokenizer, image_size: int = 28, vision_hidden: int = 32, text_hidden: int = 32):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    patch = 14
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, image_size=image_size, patch_size=patch, initializer_range=_INIT_RANGE,
    )
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    per_frame = ((image_size // patch) // 2) ** 2  # the patch grid average-pooled with stride 2
    ids = tokenizer.convert_tokens_to_ids
    # video features drop CLIP's CLS ("default"): the pooler needs a square grid of patches
    config = LlavaNextVideoConfig(
        vision_config=vision, text_config=LlamaConfig(**_llama_text_kwargs(tokenizer, text_hidden)),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=(image_size // patch) ** 2,
        video_seq_length=per_frame, spatial_pool_mode="average", spatial_pool_stride=2,
    )
    image_processor = _image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    # frames: shortest edge to image_size, then centre-cropped to the tower's square input, as the real checkpoint
    video_processor = LlavaNextVideoVideoProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaNextVideoProcessor(
        video_processor=video_processor, image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=REAL_TEMPLATES["llava_next_video"],
    )
    return LlavaNextVideoForConditionalGeneration(config), processor


_BUILDERS = {
    "llava": _build_llava,
    "qwen2_vl": _build_qwen2_vl,
    "idefics3": _build_idefics3,
    "smolvlm": _build_smolvlm,
    "gemma3": _build_gemma3,
    "paligemma": _build_paligemma,
    "mistral3": _build_mistral3,
    "mllama": _build_mllama,
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen3_vl": _build_qwen3_vl,
    "internvl": _build_internvl,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "llava_next_video": _build_llava_next_video,
}


def parse_tiny_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``(family, options)`` of a tiny-model spec: ``"llava"`` or ``"llava?image_size=56&vision_hidden=64"``.

    ``spec`` is what follows ``tiny:`` in ``model_name_or_path``. Options are ``name=int`` pairs
    joined by ``&`` (see :data:`TINY_OPTIONS`); they are checked by :func:`build_tiny_vlm`.
    """
    family, _, query = spec.partition("?")
    options: dict[str, int] = {}
    for item in filter(None, query.split("&")):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"tiny model option {item!r} in {spec!r} is not name=value")
        if name in options:
            raise ValueError(f"tiny model option {name!r} given twice in {spec!r}")
        try:
            options[name] = int(value)
        except ValueError:
            raise ValueError(f"tiny model option {name}={value!r} in {spec!r} is not an integer") from None
    return family, options


def _check_options(family: str, options: dict[str, int]) -> dict[str, int]:
    defaults = TINY_OPTIONS[family]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown tiny model option(s) {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **options}
    step = _IMAGE_STEP[family]
    if merged["image_size"] < step or merged["image_size"] % step:
        raise ValueError(f"{family}: image_size must be a positive multiple of {step}, got {merged['image_size']}")
    if merged["vision_hidden"] < 2 or merged["vision_hidden"] % 2:
        raise ValueError(f"{family}: vision_hidden must be a positive multiple of 2, got {merged['vision_hidden']}")
    if merged["text_hidden"] < 32 or merged["text_hidden"] % 32:
        raise ValueError(f"{family}: text_hidden must be a positive multiple of 32, got {merged['text_hidden']}")
    return merged


def build_tiny_vlm(
    family: str,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    *,
    image_size: int | None = None,
    vision_hidden: int | None = None,
    text_hidden: int | None = None,
    vision_init_factor: int | None = None,
):
    """Build a tiny random VLM of ``family`` and its processor, optionally saving both.

    Args:
        family: One of ``TINY_FAMILIES`` (``"llava"``, ``"qwen2_vl"``, ``"idefics3"``), or a spec
            with size options, ``"llava?image_size=56&vision_hidden=64"`` (see :func:`parse_tiny_spec`).
        out_dir: If given, ``save_pretrained`` model and processor there, so that
            ``AutoModelForImageTextToText.from_pretrained(out_dir)`` and
            ``AutoProcessor.from_pretrained(out_dir)`` load them back.
        seed: Seed of the random weight initialisation.
        image_size: Side of the processed images in pixels (``None``: the family's default, see
            :data:`TINY_OPTIONS`). For llava the vision tower sees ``(image_size / 14) ** 2``
            image tokens, e.g. 16 at 56 px.
        vision_hidden: Hidden size of the vision tower (its MLP is twice as wide; ``None``: 32).
        text_hidden: Hidden size of the language model (its MLP is twice as wide; ``None``: 32).
        vision_init_factor: llava only: ``initializer_factor`` of the CLIP vision tower (``None``: 10).

    Returns:
        ``(model, processor)``; the model is in eval mode, float32, on CPU.
    """
    family, options = parse_tiny_spec(family)
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    given = {"image_size": image_size, "vision_hidden": vision_hidden, "text_hidden": text_hidden, "vision_init_factor": vision_init_factor}
    for name, value in given.items():
        if value is not None:
            if name in options and options[name] != value:
                raise ValueError(f"{name} given twice with different values: {options[name]} and {value}")
            options[name] = int(value)
    sizes = _check_options(family, options)
    tokenizer = build_tiny_tokenizer(
        _FAMILY_SPECIAL_TOKENS[family], add_bos=family in _ADDS_BOS, named_tokens=_NAMED_TOKENS.get(family)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _BUILDERS[family](tokenizer, **sizes)
    model.eval()
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor
