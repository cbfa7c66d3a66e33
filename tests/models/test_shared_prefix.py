"""shared_prefix_next_logits: a judge's rows about one prompt (answers x aspects) run its media and question once and
each row's own tokens over their KV cache. The next-token probabilities equal the rows run whole, for every tiny
family that takes the path (images; videos where the family takes them, placed inside the question); families whose
prompt attention or per-token inputs it does not rebuild fall back (``None``), as do rows that differ before the media
and a single row."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from vpa_lightning.models import build_tiny_vlm  # noqa: E402
from vpa_lightning.models.generation import chat_prompt, encode_for_generation, shared_prefix_next_logits, to_model  # noqa: E402
from vpa_lightning.models.tiny import TINY_FAMILIES  # noqa: E402

FALLBACK = {"gemma3": "token_type_ids", "paligemma": "token_type_ids", "mllama": "cross_attention_mask"}


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((56, 56, 3)) * 255).astype(np.uint8))


def _requests(n: int = 4) -> list[str]:
    """Rating requests as the hf judge asks them: the question first, then an answer, then the aspect."""
    return [f"You rate answers.\nQuestion about the image: what is in it?\nAnswer: a cat {'sat ' * i}there.\n"
            f"Rate the answer's {'helpfulness' if i % 2 else 'faithfulness'} from 1 to 5. Reply with the number only."
            for i in range(n)]


def _both(model, processor, images, texts, offsets=None, videos=None, video_offsets=None):
    """(shared-prefix probabilities or None, the rows run whole)."""
    n = len(texts)
    kw = {"videos": [videos] * n, "video_offsets": [video_offsets] * n} if videos else {}
    one_kw = {"videos": [videos], "video_offsets": [video_offsets]} if videos else {}
    param = next(model.parameters())
    move = lambda enc: {k: to_model(v, k, param) for k, v in enc.items() if torch.is_tensor(v)}  # noqa: E731
    rows = move(encode_for_generation(processor, [images] * n, texts, [offsets] * n, **kw))
    one = move(encode_for_generation(processor, [images], texts[:1], [offsets], **one_kw))
    prompts = [chat_prompt(processor, t, len(images), offsets, len(videos or []), video_offsets) for t in texts]
    fast = shared_prefix_next_logits(model, processor, prompts, one)
    with torch.no_grad():
        whole = model(**rows, logits_to_keep=1, use_cache=False, return_dict=True).logits[:, -1]
    return (None if fast is None else fast.float().softmax(-1)), whole.float().softmax(-1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rating_rows_equal_the_rows_run_whole(family) -> None:
    model, processor = build_tiny_vlm(family)
    fast, whole = _both(model, processor, [_image()], _requests())
    if family in FALLBACK:
        assert fast is None, f"{family} has {FALLBACK[family]}: its rows must run whole"
        return
    assert fast is not None, family
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=0)
    assert (fast[1:] - fast[0]).abs().amax() > 1e-4  # each row its own tokens, not the first row's four times


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "llava_next_video"])
def test_video_rows_equal_the_rows_run_whole(family) -> None:
    pytest.importorskip("torchvision")  # the video processors
    from .test_video import clip

    model, processor = build_tiny_vlm(family)
    texts = [f"Look at the clip:  Answer {i}: it moves {'left' if i % 2 else 'right'}. Rate it from 1 to 5."
             for i in range(3)]
    fast, whole = _both(model, processor, [], texts, videos=[clip(4)], video_offsets=[18])
    assert fast is not None
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=0)
    other, _ = _both(model, processor, [], texts, videos=[clip(4, seed=5)], video_offsets=[18])
    assert (other - fast).abs().amax() > 1e-6  # the clip reaches every row through the shared cache


def test_rows_that_differ_before_the_media_or_one_row_run_whole() -> None:
    model, processor = build_tiny_vlm("llava")
    texts = ["First, about this image: what is it?", "Second, about this image: what is it?"]
    fast, whole = _both(model, processor, [_image()], texts, offsets=[len("First, about this image:")])
    assert fast is None and whole.shape[0] == 2  # the answer tokens differ before the image: nothing to share
    fast, _ = _both(model, processor, [_image()], _requests(1))
    assert fast is None


def test_the_media_run_once() -> None:
    """The vision tower runs on one row's image, not on every row's."""
    model, processor = build_tiny_vlm("llava")
    seen: list[int] = []
    tower = model.model.vision_tower
    handle = tower.register_forward_hook(lambda mod, args, kwargs_out: seen.append(int(args[0].shape[0])))
    try:
        fast, whole = _both(model, processor, [_image()], _requests(6))
    finally:
        handle.remove()
    assert fast is not None and seen == [1, 6]  # the shared path, then the whole rows


def test_an_image_and_a_video_in_one_question() -> None:
    """Qwen2-VL with an image and a clip placed inside the question: M-RoPE positions over both media, then text."""
    pytest.importorskip("torchvision")
    from .test_video import clip

    model, processor = build_tiny_vlm("qwen2_vl")
    texts = [f"Compare  with . Answer {i}: the {'clip' if i % 2 else 'image'} is brighter. Rate it from 1 to 5."
             for i in range(3)]
    fast, whole = _both(model, processor, [_image(2)], texts, offsets=[8], videos=[clip(4)], video_offsets=[14])
    assert fast is not None
    torch.testing.assert_close(fast, whole, atol=1e-5, rtol=0)
