"""Video groups (Qwen2-VL, Qwen2.5-VL; LLaVA-OneVision and LLaVA-NeXT-Video at the end): the placeholder where the prompt had it, the family's own template and
processor tokens, log-probs equal to a per-sequence forward (vision once per group), the packed and the KV-cache
prefix-sharing paths equal to the plain one (log-probs and gradients; temporal M-RoPE positions past the text's),
truncation that never cuts video tokens, and families without video input refused with the families that have it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # the Qwen2-VL processors need a video processor

from PIL import Image  # noqa: E402

from vpa_lightning.errors import VideoUnsupportedError  # noqa: E402
from vpa_lightning.models import PreferenceGroup, build_group_batch, build_tiny_vlm, group_logps, prompt_messages  # noqa: E402
from vpa_lightning.models.families import family_of, video_model_types  # noqa: E402
from vpa_lightning.models.packed import pack_groups  # noqa: E402
from vpa_lightning.models.video import VideoClip  # noqa: E402

from ..videos import moving_frames  # noqa: E402
from .test_packed import _assert_same, _grads  # noqa: E402

VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


_CACHE: dict[str, tuple] = {}


def _tiny(family: str):
    if family not in _CACHE:
        _CACHE.clear()
        _CACHE[family] = build_tiny_vlm(family)
    return _CACHE[family]


def clip(n: int, size: tuple[int, int] = (56, 56), seed: int = 0, fps: float = 4.0) -> VideoClip:
    """``n`` frames of moving shapes, as if sampled every other frame of a ``2n``-frame video at ``fps``."""
    return VideoClip(frames=moving_frames(n, size, seed), fps=fps, total_frames=2 * n, indices=list(range(0, 2 * n, 2)),
                     name=f"v{seed}")


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8))


def video_groups() -> list[PreferenceGroup]:
    """A video group with 4 answers (16 frames: 8 temporal patches, far more than its 2 rows of merged patches, at
    the end of the prompt, so the video's temporal positions run past the prompt's last token's), a video + image
    group with 2, a text-only group with 3, and a group with two videos of different sizes."""
    return [
        PreferenceGroup(None, "What moves in this clip? ", ["A red square moves right.", "Nothing moves.", "A bar.", "Blue"],
                        id="video", images=[], videos=[clip(16)], video_offsets=[25]),
        PreferenceGroup(None, "Compare  with .", ["They match.", "The clip shows more."], id="image+video",
                        images=[_image(1)], image_offsets=[8], videos=[clip(3, (32, 48), seed=1)], video_offsets=[14]),
        PreferenceGroup(None, "Say hello.", ["Hello there.", "No.", "Hi"], id="text", images=[]),
        PreferenceGroup(None, "Which is faster?", ["The first.", "The second one is."], id="two videos", images=[],
                        videos=[clip(2, (28, 28), seed=2), clip(4, (56, 28), seed=3)]),
    ]


def test_prompt_messages_place_videos_at_their_offsets() -> None:
    # without videos: exactly the image-only messages
    assert prompt_messages("Compare  with .", 2, [8, 14]) == prompt_messages("Compare  with .", 2, [8, 14], 0, None)
    content = prompt_messages("Compare  with : which?", 1, [8], 1, [14])[0]["content"]
    assert content == [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "},
                       {"type": "video"}, {"type": "text", "text": ": which?"}]
    # same offset: images first; no offsets: every medium before the text, images first
    assert [p["type"] for p in prompt_messages("Hi", 1, [0], 2, [0, 2])[0]["content"]] == ["image", "video", "text", "video"]
    assert [p["type"] for p in prompt_messages("Hi", 1, None, 1, None)[0]["content"]] == ["image", "video", "text"]
    with pytest.raises(ValueError, match="video offsets"):
        prompt_messages("Hi", 0, None, 1, [5])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_sequence_is_the_templates_and_the_processors(family) -> None:
    """Each row is the family's own ``apply_chat_template([user, assistant])`` through its processor with the video:
    the video part rendered where the prompt had it, its ``<|video_pad|>`` tokens expanded by the processor."""
    _, processor = _tiny(family)
    group = video_groups()[1]
    batch = build_group_batch(processor, [group])
    messages = prompt_messages(group.prompt, 1, group.image_offsets, 1, group.video_offsets)
    video = group.videos[0]
    for r, response in enumerate(group.responses):
        text = processor.apply_chat_template(
            [*messages, {"role": "assistant", "content": [{"type": "text", "text": response}]}], tokenize=False
        )
        assert "Compare <|vision_start|><|image_pad|><|vision_end|> with <|vision_start|><|video_pad|><|vision_end|>." in text
        own = processor(text=[text], images=[group.images[0]], videos=[video.frames], return_tensors="pt",
                        videos_kwargs={"do_sample_frames": False, "video_metadata": [video.metadata()]})
        ids = batch.model_inputs["input_ids"][r][batch.model_inputs["attention_mask"][r].bool()]
        expected = own["input_ids"][0]
        if not text.endswith("<|im_end|>\n") and not text.endswith("<|end|>\n"):
            raise AssertionError(text)
        assert ids.tolist() == expected[: len(ids)].tolist()  # up to the end-of-turn token (the newline after is not scored)
        assert len(expected) - len(ids) == 1
        torch.testing.assert_close(batch.model_inputs["pixel_values_videos"][: own["pixel_values_videos"].shape[0]],
                                   own["pixel_values_videos"])
        assert batch.model_inputs["video_grid_thw"][r].tolist() == own["video_grid_thw"][0].tolist()
    assert batch.video_counts.tolist() == [1, 1] and batch.video_inputs[0] == "video_grid_thw"
    if family == "qwen2_5_vl":  # its temporal positions are spaced in seconds: 2 frames per patch at 2 sampled fps
        assert batch.model_inputs["second_per_grid_ts"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_logps_equal_a_forward_per_sequence(family) -> None:
    """The batch's log-probs (vision tower once per group, for images and videos) equal each sequence's alone, and
    the visual features reach the answers (another video changes them)."""
    model, processor = _tiny(family)
    groups = video_groups()
    batch = build_group_batch(processor, groups)
    calls = []
    visual = model.model.visual
    hook = visual.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        with torch.no_grad():
            got = group_logps(model, batch).sum_logps
    finally:
        hook.remove()
    # one vision pass per call of get_image_features / get_video_features: images once, videos once
    assert len(calls) == 2
    with torch.no_grad():
        alone = [group_logps(model, build_group_batch(processor, [dataclasses.replace(g, responses=[r])])).sum_logps[0]
                 for g in groups for r in g.responses]
        other = dataclasses.replace(groups[0], videos=[clip(16, seed=4)])
        moved = group_logps(model, build_group_batch(processor, [other])).sum_logps
    torch.testing.assert_close(got, torch.stack(alone), rtol=1e-5, atol=1e-4)
    assert (moved - got[:4]).abs().max() > 1e-4


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("truncate", [False, True])
def test_packed_video_groups_equal_the_plain_path(family, truncate, no_pack_fallback) -> None:
    """Packed shared-prefix groups (each group's prompt + video once, its 2-4 answers after it) give the plain
    path's log-probs and gradients, with gradient checkpointing, several groups per row, and responses truncated;
    so do prefix sharing over the KV cache and the varlen layout. The video's temporal positions run past the text after it (the
    responses continue from the prompt's last token, not from the largest position)."""
    model, processor = _tiny(family)
    groups = video_groups()
    full = build_group_batch(processor, groups)
    batch = build_group_batch(processor, groups, max_length=int(full.prompt_lengths.max()) + 2) if truncate else full
    assert bool(batch.truncated.any()) == truncate
    rope = model.model.get_rope_index
    ids, mm = batch.model_inputs["input_ids"][:1], batch.model_inputs["mm_token_type_ids"][:1]
    extra = {"second_per_grid_ts": batch.model_inputs["second_per_grid_ts"][:1]} if family == "qwen2_5_vl" else {}
    plen = int(batch.prompt_lengths[0])
    pos, _ = rope(ids[:, :plen], mm_token_type_ids=mm[:, :plen], video_grid_thw=batch.model_inputs["video_grid_thw"][:1], **extra)
    assert int(pos.max()) > int(pos[0, 0, -1])  # the largest position is a video's, not the prompt's last token's
    plain = _grads(model, batch)
    packed_in = pack_groups(model, batch, max_tokens=10_000)
    assert packed_in.model_inputs["input_ids"].shape[0] == 1 and "pixel_values_videos" in packed_in.model_inputs
    assert packed_in.tokens < int(batch.model_inputs["attention_mask"].sum())  # each prompt + video once
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        _assert_same(plain, _grads(model, batch, pack=True, pack_tokens=10_000))
        _assert_same(plain, _grads(model, batch, pack=True, method="forward"))
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    _assert_same(plain, _grads(model, batch, share_prefix=True))
    # the variable-length layout of the packed path (here its per-sequence SDPA reference; flash attention on CUDA)
    _assert_same(plain, _grads(model, batch, pack=True, pack_attention="varlen"))


def test_truncation_never_cuts_video_tokens() -> None:
    """With ``max_length`` the responses are cut, never the video: a prompt whose video tokens leave no room for an
    answer is refused (the data module skips it with the reason ``tokenisation``)."""
    _, processor = _tiny("qwen2_vl")
    group = video_groups()[0]
    full = build_group_batch(processor, [group])
    video_id = processor.video_token_id
    n_video = int((full.model_inputs["input_ids"][0] == video_id).sum())
    assert n_video == 8 * 2 * 2  # 8 temporal patches x 2 x 2 merged patches
    cut = build_group_batch(processor, [group], max_length=int(full.prompt_lengths[0]) + 1)
    assert bool(cut.truncated.all())
    assert int((cut.model_inputs["input_ids"] == video_id).sum(dim=1)[0]) == n_video
    with pytest.raises(ValueError, match="image and video tokens included"):
        build_group_batch(processor, [group], max_length=int(full.prompt_lengths[0]))


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_families_without_video_are_refused_by_name(family) -> None:
    """A family that takes no video refuses a video group at once (never a silent text-only row), naming the model
    types that take video."""
    model, processor = build_tiny_vlm(family)
    assert not family_of(processor).takes_video(processor) and not family_of(model).takes_video(model)
    with pytest.raises(VideoUnsupportedError, match="qwen2_vl, qwen2_5_vl") as exc:
        build_group_batch(processor, [video_groups()[0]])
    assert type(processor).__name__ in str(exc.value)
    assert video_model_types() == ["llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
    for name in [*VIDEO_FAMILIES, *ONE_TENSOR_FAMILIES]:
        assert family_of(name).takes_video(_tiny(name)[1])


#: Families that batch their videos as one ``[videos, frames, C, H, W]`` tensor, and what the second group's prompt
#: decodes to (10 image tokens; 4 frames x 1 pooled patch, + OneVision's newline).
ONE_TENSOR_FAMILIES = {
    "llava_onevision": "<image>" * 10 + "<video>" * 5 + "\nCompare \n with \n.",
    "llava_next_video": "USER: " + "<image>" * 10 + "\n" + "<video>" * 4 + "\nCompare   with  . ASSISTANT:",
}


def onevision_groups() -> list[PreferenceGroup]:
    """LLaVA-OneVision and LLaVA-NeXT-Video batch their videos as one tensor: every video here has 4 frames (of
    different sizes: the processor resizes each frame to its fixed size)."""
    return [
        PreferenceGroup(None, "What moves? ", ["A red square moves right.", "Nothing moves.", "A bar."], id="video",
                        images=[], videos=[clip(4, (28, 28))], video_offsets=[12]),
        PreferenceGroup(None, "Compare  with .", ["They match.", "The clip shows more."], id="image+video",
                        images=[_image(1)], image_offsets=[8], videos=[clip(4, (56, 28), seed=1)], video_offsets=[14]),
        PreferenceGroup(None, "Say hello.", ["Hello there.", "No."], id="text", images=[]),
    ]


@pytest.mark.parametrize("family", sorted(ONE_TENSOR_FAMILIES))
def test_one_tensor_video_groups(family, no_pack_fallback) -> None:
    """LLaVA-OneVision, LLaVA-NeXT-Video: the template's ``<video>`` after the images, expanded by the processor
    (frames x pooled patches, + a newline for OneVision); log-probs equal each sequence's alone (vision once per
    group), the packed (mask and varlen layouts) and the KV-cache paths equal the plain one (log-probs and
    gradients); a batch of videos with different frame counts is refused with the reason."""
    model, processor = _tiny(family)
    groups = onevision_groups()
    batch = build_group_batch(processor, groups)
    assert batch.model_inputs["pixel_values_videos"].shape[:2] == (5, 4) and batch.video_counts.tolist() == [1] * 5 + [0] * 2
    text = processor.tokenizer.decode(batch.model_inputs["input_ids"][3])
    assert ONE_TENSOR_FAMILIES[family] in text
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            group_logps(model, batch)
    finally:
        hook.remove()
    # one vision pass for the images, one for the videos: each group's first row only (2 images' crops; 2 x 4 frames)
    assert len(calls) == 2 and calls[1] == 2 * 4
    with torch.no_grad():
        got = group_logps(model, batch).sum_logps
        alone = [group_logps(model, build_group_batch(processor, [dataclasses.replace(g, responses=[r])])).sum_logps[0]
                 for g in groups for r in g.responses]
    torch.testing.assert_close(got, torch.stack(alone), rtol=1e-5, atol=1e-4)
    plain = _grads(model, batch)
    _assert_same(plain, _grads(model, batch, pack=True, pack_tokens=10_000))
    _assert_same(plain, _grads(model, batch, share_prefix=True))
    _assert_same(plain, _grads(model, batch, pack=True, pack_attention="varlen"))
    packed_in = pack_groups(model, batch, max_tokens=10_000)
    assert packed_in.tokens < int(batch.model_inputs["attention_mask"].sum())  # each prompt + video once
    assert packed_in.model_inputs["pixel_values_videos"].shape[0] == 2  # one video per group with a video
    mixed = [groups[0], dataclasses.replace(groups[1], videos=[clip(2, (28, 28))])]
    with pytest.raises(ValueError, match="one frame count"):
        build_group_batch(processor, mixed)


@pytest.mark.parametrize("family", sorted(ONE_TENSOR_FAMILIES))
def test_tiny_video_model_saves_and_loads_back(family, tmp_path) -> None:
    """``tiny:<family>`` saved loads back with the Auto classes (its video processor included): the same video
    batch, the same log-probs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = build_tiny_vlm(family, out_dir=tmp_path, seed=3)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    assert type(loaded_processor.video_processor) is type(processor.video_processor)
    groups = onevision_groups()
    batch, again = build_group_batch(processor, groups), build_group_batch(loaded_processor, groups)
    assert batch.model_inputs.keys() == again.model_inputs.keys()
    for k, v in batch.model_inputs.items():
        assert torch.equal(v, again.model_inputs[k]), k
    with torch.no_grad():
        torch.testing.assert_close(group_logps(loaded, again).sum_logps, group_logps(model, batch).sum_logps)
