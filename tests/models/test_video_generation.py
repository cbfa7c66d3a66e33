"""Greedy generation with video prompts (Qwen2-VL; LLaVA-NeXT-Video and LLaVA-OneVision at the end): the answers equal ``model.generate`` on the processor's own
encoding of the same chat (the video where its offset places it, the frames with their metadata), the video
reaches the answer, videos and images mix in one batch, and a family without video refuses a video prompt by name."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # the Qwen2-VL processors need a video processor

from vpa_lightning.errors import VideoUnsupportedError  # noqa: E402
from vpa_lightning.models import build_tiny_vlm  # noqa: E402
from vpa_lightning.models.generation import encode_for_generation, generate_answers  # noqa: E402

from .test_video import _image, clip  # noqa: E402


@pytest.fixture(scope="module")
def tiny_qwen():
    return build_tiny_vlm("qwen2_vl")


def test_video_answers_equal_generate_on_the_processors_own_inputs(tiny_qwen) -> None:
    model, processor = tiny_qwen
    video = clip(4)
    question = "What moves in  the clip?"
    answers = generate_answers(model, processor, [[]], [question], videos=[[video]], video_offsets=[[14]],
                               max_new_tokens=8)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What moves in "}, {"type": "video"},
                                             {"type": "text", "text": " the clip?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "What moves in <|vision_start|><|video_pad|><|vision_end|> the clip?" in text
    own = processor(text=[text], videos=[video.frames], return_tensors="pt",
                    videos_kwargs={"do_sample_frames": False, "video_metadata": [video.metadata()]})
    assert own["pixel_values_videos"].shape[0] > 0
    with torch.no_grad():
        out = model.generate(**own, do_sample=False, max_new_tokens=8, pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(out[0, own["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answers == [expected] and expected
    enc = encode_for_generation(processor, [[]], [question], videos=[[video]], video_offsets=[[14]])
    assert enc["input_ids"].tolist() == own["input_ids"].tolist()
    torch.testing.assert_close(enc["pixel_values_videos"], own["pixel_values_videos"])


def test_video_reaches_the_answer_and_mixes_with_images_and_text(tiny_qwen) -> None:
    model, processor = tiny_qwen
    questions = ["Describe the clip.", "Describe it.", "Say hello.", "Compare  with ."]
    images = [[], [], [], [_image(1)]]
    videos = [clip(4, seed=0), clip(4, seed=3), None, [clip(2, (28, 28), seed=1)]]
    batched = generate_answers(model, processor, images, questions, videos=videos, max_new_tokens=6, batch_size=4,
                               offsets=[None, None, None, [8]], video_offsets=[None, None, None, [14]])
    alone = [generate_answers(model, processor, [im], [q], videos=[v], max_new_tokens=6, offsets=[at], video_offsets=[vat])[0]
             for im, q, v, at, vat in zip(images, questions, videos, [None, None, None, [8]], [None, None, None, [14]])]
    assert batched == alone  # left padding and the per-video inputs line up with their rows
    enc = encode_for_generation(processor, images[:2], questions[:2], videos=videos[:2])
    other = dict(enc, pixel_values_videos=torch.zeros_like(enc["pixel_values_videos"]))
    with torch.no_grad():
        logits = model(**enc).logits[:, -1]
        blank = model(**other).logits[:, -1]
    assert (logits - blank).abs().max() > 1e-4  # the frames reach the next-token distribution
    assert enc["video_grid_thw"].shape[0] == 2


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_a_family_without_video_refuses_a_video_prompt(family) -> None:
    model, processor = build_tiny_vlm(family)
    with pytest.raises(VideoUnsupportedError, match="qwen2_vl, qwen2_5_vl"):
        generate_answers(model, processor, [[]], ["What moves?"], videos=[clip(2)], max_new_tokens=2)
    assert generate_answers(model, processor, [[]], ["Say hi."], videos=[None], max_new_tokens=2)  # no video: fine


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_one_tensor_video_families_generate_as_model_generate(family) -> None:
    """LLaVA-NeXT-Video and LLaVA-OneVision (``pixel_values_videos`` ``[videos, frames, ...]``): greedy answers equal
    ``model.generate`` on the processor's own encoding of the chat, batched (a video prompt, a text-only one and a
    video + image one) as one at a time; the frames reach the next-token distribution."""
    model, processor = build_tiny_vlm(family)
    video = clip(4)
    question = "What moves in  the clip?"
    answers = generate_answers(model, processor, [[]], [question], videos=[[video]], video_offsets=[[14]],
                               max_new_tokens=6)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What moves in "}, {"type": "video"},
                                             {"type": "text", "text": " the clip?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    own = processor(text=[text], videos=[video.frames], return_tensors="pt",
                    videos_kwargs={"do_sample_frames": False, "video_metadata": [video.metadata()]})
    with torch.no_grad():
        out = model.generate(**own, do_sample=False, max_new_tokens=6, pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(out[0, own["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answers == [expected]
    enc = encode_for_generation(processor, [[]], [question], videos=[[video]], video_offsets=[[14]])
    assert enc["input_ids"].tolist() == own["input_ids"].tolist()
    torch.testing.assert_close(enc["pixel_values_videos"], own["pixel_values_videos"])
    questions, images = ["Describe the clip.", "Say hello.", "Compare  with ."], [[], [], [_image(1)]]
    videos, where = [clip(4, seed=3), None, [clip(4, (56, 28), seed=1)]], [None, None, [8]]
    video_where = [None, None, [14]]
    batched = generate_answers(model, processor, images, questions, videos=videos, max_new_tokens=5, batch_size=3,
                               offsets=where, video_offsets=video_where)
    alone = [generate_answers(model, processor, [im], [q], videos=[v], max_new_tokens=5, offsets=[at], video_offsets=[vat])[0]
             for im, q, v, at, vat in zip(images, questions, videos, where, video_where)]
    assert batched == alone
    enc = encode_for_generation(processor, [[]], [question], videos=[[video]])
    blank = dict(enc, pixel_values_videos=torch.zeros_like(enc["pixel_values_videos"]))
    with torch.no_grad():
        assert (model(**enc).logits[:, -1] - model(**blank).logits[:, -1]).abs().max() > 1e-4
