"""Batched group log-probs on tiny real VLMs (LLaVA, Qwen2-VL, Idefics3), all offline on CPU.

The reference for every check is a plain per-sequence transformers forward:
processor(prompt with image) + separately tokenised response, ``model(**inputs).logits``,
log_softmax, gather over the response tokens.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vpa_lightning.models import (
    TINY_FAMILIES,
    GroupLogps,
    PreferenceGroup,
    build_group_batch,
    build_tiny_vlm,
    family_of,
    group_logps,
    prompt_messages,
)
from vpa_lightning.models.logps import IGNORE_INDEX

_HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
# three layouts in depth here (per-image pixel_values, flat patches + M-RoPE, per-row nested images);
# every family is checked against its own chat template in test_families.py
FAMILIES = [
    pytest.param(f, marks=pytest.mark.skipif(f == "qwen2_vl" and not _HAS_TORCHVISION, reason="needs torchvision"))
    for f in ("llava", "qwen2_vl", "idefics3")
]
assert set(FAMILIES[0].values) <= set(TINY_FAMILIES)


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _groups() -> list[PreferenceGroup]:
    # different K, image sizes (-> different numbers of image tokens for Qwen2-VL) and lengths
    return [
        PreferenceGroup(
            _image(40, 30, 0), "What is in the image?", ["A cat.", "A dog on a red sofa next to a window."], id="g0"
        ),
        PreferenceGroup(
            _image(56, 56, 1),
            "Describe the picture.",
            ["Green grass.", "It is red", "Blue sky with ü and 日本"],
            id="g1",
        ),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = build_tiny_vlm(request.param)
    return request.param, model, processor


def reference_logps(model, processor, group: PreferenceGroup, response: str, max_length: int | None = None):
    """Summed log-prob and token count of one response with a plain full-logits forward of one sequence."""
    family = family_of(processor)
    messages = prompt_messages(group.prompt)
    text = family.prompt_text(processor, messages)
    enc = dict(processor(text=[text], images=[[group.image]], return_tensors="pt", **family.processor_kwargs(processor, [text])))
    tok = processor.tokenizer
    resp = tok(family.response_text(processor, messages, text, response), add_special_tokens=False)["input_ids"]
    n_prompt = enc["input_ids"].shape[1]
    if max_length is not None:
        resp = resp[: max_length - n_prompt]
    resp = torch.tensor([resp])
    enc["input_ids"] = torch.cat([enc["input_ids"], resp], dim=1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    if "mm_token_type_ids" in enc:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(resp)], dim=1)
    with torch.no_grad():
        logits = model(**enc).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, enc["input_ids"][0, 1:, None])[:, 0]
    return logp[n_prompt - 1 :].sum().item(), resp.shape[1]


@pytest.mark.parametrize("method", ["forward", "hidden"])
def test_batched_equals_per_sequence_forward(tiny, method) -> None:
    _, model, processor = tiny
    groups = _groups()
    batch = build_group_batch(processor, groups)
    with torch.no_grad():
        out = group_logps(model, batch, method=method, chunk_size=4)
    assert out.sum_logps.shape == (5,) and out.group_sizes == [2, 3]
    assert out.group_index.tolist() == [0, 0, 1, 1, 1]
    expected = [reference_logps(model, processor, g, r) for g in groups for r in g.responses]
    torch.testing.assert_close(out.sum_logps, torch.tensor([e[0] for e in expected]), rtol=1e-5, atol=1e-5)
    assert out.n_tokens.tolist() == [e[1] for e in expected]
    torch.testing.assert_close(out.mean_logps, out.sum_logps / out.n_tokens)
    assert [t.shape[0] for t in out.per_group()] == [2, 3]
    with pytest.raises(ValueError, match="different sizes"):
        out.as_matrix()


def test_labels_mask_prompt_image_and_padding(tiny) -> None:
    _, model, processor = tiny
    batch = build_group_batch(processor, _groups())
    ids, labels, mask = batch.model_inputs["input_ids"], batch.labels, batch.model_inputs["attention_mask"]
    image_token_id = model.config.image_token_id
    assert (ids == image_token_id).any()
    assert (labels[ids == image_token_id] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    for i, n_prompt in enumerate(batch.prompt_lengths.tolist()):
        assert (labels[i, :n_prompt] == IGNORE_INDEX).all()
        length = int(mask[i].sum())
        assert torch.equal(labels[i, n_prompt:length], ids[i, n_prompt:length])
        assert mask[i, :length].all()  # right padding
    assert labels[:, 0].eq(IGNORE_INDEX).all()


def test_every_processor_output_reaches_the_model_and_matters(tiny) -> None:
    family, model, processor = tiny
    groups = _groups()
    text = processor.apply_chat_template(prompt_messages(groups[0].prompt), add_generation_prompt=True, tokenize=False)
    processor_keys = set(processor(text=[text], images=[[groups[0].image]], return_tensors="pt").keys())
    seen: dict[str, object] = {}

    def spy(_module, _args, kwargs):
        seen.update(kwargs)

    handle = model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        batch = build_group_batch(processor, groups)
        with torch.no_grad():
            out = group_logps(model, batch)
    finally:
        handle.remove()
    assert processor_keys <= set(seen), processor_keys - set(seen)
    expected_extra = {
        "llava": {"pixel_values"},
        "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
        "idefics3": {"pixel_values", "pixel_attention_mask"},
    }[family]
    assert expected_extra <= set(seen)
    # a different image of the same size changes the log-probs: the pixels are used
    other = [PreferenceGroup(_image(*g.image.size, seed=99), g.prompt, g.responses) for g in groups]
    with torch.no_grad():
        out2 = group_logps(model, build_group_batch(processor, other))
    assert (out.sum_logps - out2.sum_logps).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["forward", "hidden"])
def test_lm_head_only_sees_response_positions(tiny, method) -> None:
    _, model, processor = tiny
    rows: list[int] = []

    def count(_module, args, _output):
        assert args[0].dim() == 2  # [positions, hidden]: flattened, never [N, T, hidden]
        rows.append(args[0].shape[0])

    handle = model.get_output_embeddings().register_forward_hook(count)
    try:
        batch = build_group_batch(processor, _groups())
        with torch.no_grad():
            out = group_logps(model, batch, method=method, chunk_size=4)
    finally:
        handle.remove()
    assert sum(rows) == int(out.n_tokens.sum()) < batch.model_inputs["input_ids"].numel()


def test_truncation_cuts_responses_never_image_tokens(tiny) -> None:
    _, model, processor = tiny
    groups = _groups()
    full = build_group_batch(processor, groups)
    max_length = int(full.prompt_lengths.max()) + 3
    batch = build_group_batch(processor, groups, max_length=max_length)
    assert batch.model_inputs["input_ids"].shape[1] <= max_length
    assert batch.truncated.any()
    # same prompt tokens (image tokens included) as without truncation
    for i, n in enumerate(batch.prompt_lengths.tolist()):
        assert torch.equal(batch.model_inputs["input_ids"][i, :n], full.model_inputs["input_ids"][i, :n])
    with torch.no_grad():
        out = group_logps(model, batch)
    expected = [reference_logps(model, processor, g, r, max_length) for g in groups for r in g.responses]
    torch.testing.assert_close(out.sum_logps, torch.tensor([e[0] for e in expected]), rtol=1e-5, atol=1e-5)
    assert out.n_tokens.tolist() == [e[1] for e in expected]
    with pytest.raises(ValueError, match=r"group 0 \(id='g1'\): the prompt takes .*max_length=10"):
        build_group_batch(processor, groups[1:], max_length=10)


def test_gradients_flow(tiny) -> None:
    _, model, processor = tiny
    groups = _groups()[:1]
    model.zero_grad()
    out = group_logps(model, build_group_batch(processor, groups))
    out.sum_logps.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_save_and_load_back_with_auto_classes(tiny, tmp_path) -> None:
    family, _, _ = tiny
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = build_tiny_vlm(family, out_dir=tmp_path, seed=3)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    groups = _groups()
    batch = build_group_batch(processor, groups)
    loaded_batch = build_group_batch(loaded_processor, groups)
    for k, v in batch.model_inputs.items():
        assert torch.equal(v, loaded_batch.model_inputs[k]), k
    with torch.no_grad():
        torch.testing.assert_close(group_logps(loaded, loaded_batch).sum_logps, group_logps(model, batch).sum_logps)


def test_group_logps_matrix_and_errors() -> None:
    out = GroupLogps(
        torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 1]), [2, 2]
    )
    assert out.as_matrix().tolist() == [[-1.0, -2.0], [-3.0, -4.0]]
    assert out.as_matrix(average=True).tolist() == [[-1.0, -1.0], [-1.0, -1.0]]
    with pytest.raises(ValueError, match="family"):
        build_tiny_vlm("nope")


def test_processor_padding_side_does_not_matter(tiny) -> None:
    _, _, processor = tiny
    groups = _groups()
    right = build_group_batch(processor, groups)
    old = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"
    try:
        left = build_group_batch(processor, groups)
    finally:
        processor.tokenizer.padding_side = old
    for k, v in right.model_inputs.items():
        assert torch.equal(v, left.model_inputs[k]), k
    assert torch.equal(right.labels, left.labels)


def test_peft_lora_model(tiny) -> None:
    peft = pytest.importorskip("peft")
    _, model, processor = tiny
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    try:
        batch = build_group_batch(processor, _groups()[:1])
        with torch.no_grad():
            fwd = group_logps(lora, batch, method="forward").sum_logps
            hid = group_logps(lora, batch, method="hidden").sum_logps
            with lora.disable_adapter():
                base = group_logps(lora, batch).sum_logps
        torch.testing.assert_close(fwd, hid, rtol=1e-5, atol=1e-5)
        assert (fwd - base).abs().max() > 1e-4  # the adapter is used
    finally:
        lora.unload()  # restore the shared module-scoped model


def test_bad_method_and_empty_inputs(tiny) -> None:
    _, model, processor = tiny
    batch = build_group_batch(processor, _groups()[:1])
    with pytest.raises(ValueError, match="method"):
        group_logps(model, batch, method="nope")
    with pytest.raises(ValueError, match="groups"):
        build_group_batch(processor, [])
    with pytest.raises(ValueError, match="max_length"):
        build_group_batch(processor, _groups(), max_length=1)
    with pytest.raises(ValueError, match="no responses"):
        build_group_batch(processor, [PreferenceGroup(_image(28, 28, 0), "Hi", [], id="x")])


def test_idefics3_image_splitting_pads_sub_images() -> None:
    # rows with different numbers of sub-images: the processor pads pixel_values / pixel_attention_mask
    model, processor = build_tiny_vlm("idefics3")
    processor.image_processor.do_image_splitting = True
    processor.image_processor.size = {"longest_edge": 112}  # crops of max_image_size = 56 px
    groups = [
        PreferenceGroup(_image(112, 84, 0), "What is in the image?", ["A cat.", "A dog on a sofa."], id="a"),
        PreferenceGroup(_image(112, 40, 1), "Describe.", ["Green.", "Red"], id="b"),
    ]
    batch = build_group_batch(processor, groups)
    pixel_mask = batch.model_inputs["pixel_attention_mask"]
    sub_images = pixel_mask.flatten(2).any(-1).sum(-1).tolist()
    assert sub_images[0] != sub_images[-1]  # 2x2 crops + global vs 2x1 crops + global
    with torch.no_grad():
        out = group_logps(model, batch)
    expected = [reference_logps(model, processor, g, r) for g in groups for r in g.responses]
    torch.testing.assert_close(out.sum_logps, torch.tensor([e[0] for e in expected]), rtol=1e-5, atol=1e-5)


def test_response_fill_of_per_token_outputs() -> None:
    if not _HAS_TORCHVISION:
        pytest.skip("qwen2_vl needs torchvision")
    _, processor = build_tiny_vlm("qwen2_vl")
    groups = _groups()[:1]
    plain = build_group_batch(processor, groups)
    filled = build_group_batch(processor, groups, response_fill={"mm_token_type_ids": 7})
    response = plain.labels != IGNORE_INDEX
    assert (filled.model_inputs["mm_token_type_ids"][response] == 7).all()
    assert (plain.model_inputs["mm_token_type_ids"][response] == 0).all()
    assert torch.equal(
        filled.model_inputs["mm_token_type_ids"][~response], plain.model_inputs["mm_token_type_ids"][~response]
    )


def test_select_rows_equals_the_full_batch_rows(tiny) -> None:
    """A sub-batch (mDPO's chosen rows) gives the same log-probs as those rows of the full batch,
    including Qwen2-VL, whose flat patches are gathered by image_grid_thw."""
    from vpa_lightning.models.logps import select_rows

    _, model, processor = tiny
    batch = build_group_batch(processor, _groups())
    rows = torch.tensor([4, 0, 2])
    with torch.no_grad():
        full = group_logps(model, batch)
        sub = group_logps(model, select_rows(batch, rows))
    torch.testing.assert_close(sub.sum_logps, full.sum_logps[rows], rtol=1e-5, atol=1e-5)
    assert sub.n_tokens.tolist() == full.n_tokens[rows].tolist()
    assert select_rows(batch, rows).group_sizes == [1, 2]


@pytest.mark.parametrize("max_length", [None, 40])
def test_prefix_sharing_equals_the_plain_forward(tiny, max_length) -> None:
    """share_prefix=True (image + prompt once per group, responses on the shared KV cache) gives the
    plain path's log-probs, token counts and gradients, for every family (Qwen2-VL: M-RoPE positions)."""
    family, _, _ = tiny
    model, processor = build_tiny_vlm(family)  # fresh: other tests freeze or wrap the shared one
    groups = _groups()
    if max_length is not None:  # room for a few response tokens: truncation must agree too
        longest_prompt = int(build_group_batch(processor, groups).prompt_lengths.max())
        max_length = longest_prompt + 3
    batch = build_group_batch(processor, groups, max_length=max_length)
    params = [p for n, p in model.named_parameters() if "layers.0" in n and p.dim() == 2][:3]
    grads = []
    results = []
    for share in (False, True):
        model.zero_grad()
        out = group_logps(model, batch, share_prefix=share)
        (out.sum_logps * torch.arange(1, 6)).sum().backward()
        grads.append([p.grad.clone() for p in params])
        results.append(out)
    plain, shared = results
    torch.testing.assert_close(shared.sum_logps, plain.sum_logps, rtol=1e-5, atol=1e-4)
    assert shared.n_tokens.tolist() == plain.n_tokens.tolist()
    assert shared.group_sizes == plain.group_sizes == [2, 3]
    for a, b in zip(*grads):  # float32 sums in another order: compare at the scale of the gradient
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
        assert float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a)) < 1e-4
    model.zero_grad()


def test_prefix_sharing_needs_one_prompt_per_group_and_forward_method() -> None:
    model, processor = build_tiny_vlm("llava")
    batch = build_group_batch(processor, _groups())
    with pytest.raises(ValueError, match="method='forward'"):
        group_logps(model, batch, method="hidden", share_prefix=True)
    batch.group_index = torch.zeros_like(batch.group_index)  # claim all 5 rows are one group
    batch.group_sizes = [5]
    with pytest.raises(ValueError, match="do not share one prompt"):
        group_logps(model, batch, share_prefix=True)


def _vision_module(family: str, model):
    return {"llava": lambda: model.model.vision_tower, "qwen2_vl": lambda: model.model.visual,
            "idefics3": lambda: model.model.vision_model}[family]()


@pytest.mark.parametrize("method", ["forward", "hidden"])
def test_vision_tower_runs_once_per_group(tiny, method) -> None:
    """The default path encodes each group's image once (2 images for 2 groups of 2 + 3 rows), with the
    same log-probs and gradients (vision tower and projector included) as encoding every row."""
    family, _, _ = tiny
    model, processor = build_tiny_vlm(family)  # fresh: other tests freeze or wrap the shared one
    batch = build_group_batch(processor, _groups())
    images_seen: list[int] = []

    def count(_module, args, kwargs):
        if family == "qwen2_vl":
            images_seen.append(kwargs["grid_thw"].shape[0])
        else:
            images_seen.append((args[0] if args else kwargs["pixel_values"]).shape[0])

    handle = _vision_module(family, model).register_forward_pre_hook(count, with_kwargs=True)
    results, grads, counts = [], [], []
    try:
        for share in (False, True):
            model.zero_grad()
            images_seen.clear()
            out = group_logps(model, batch, method=method, share_image=share)
            (out.sum_logps * torch.arange(1, 6)).sum().backward()
            counts.append(sum(images_seen))
            results.append(out)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        handle.remove()
    assert counts == [5, 2]
    plain, shared = results
    torch.testing.assert_close(shared.sum_logps, plain.sum_logps, rtol=1e-5, atol=1e-5)
    assert shared.n_tokens.tolist() == plain.n_tokens.tolist()
    assert grads[0].keys() == grads[1].keys()
    vision = [n for n in grads[0] if any(k in n for k in ("vision", "visual", "projector", "connector", "merger"))]
    assert vision, "the vision side should get gradients"
    # float32 sums in another order: compare at the scale of the gradients (k_proj biases get ~0 in exact arithmetic)
    scale = max(float(torch.linalg.vector_norm(g)) for g in grads[0].values())
    for name, a in grads[0].items():
        assert float(torch.linalg.vector_norm(grads[1][name] - a)) <= 1e-4 * scale + 1e-3 * float(torch.linalg.vector_norm(a)), name
    model.zero_grad()


def test_encode_images_once_leaves_one_row_groups_and_the_model_as_they_were(tiny) -> None:
    from vpa_lightning.models.logps import encode_images_once, select_rows

    family, model, processor = tiny
    batch = build_group_batch(processor, _groups())
    one_each = select_rows(batch, torch.tensor([0, 2]))  # one row per group: nothing to share
    with torch.no_grad():
        out = group_logps(model, one_each)
        full = group_logps(model, batch)
    torch.testing.assert_close(out.sum_logps, full.sum_logps[[0, 2]], rtol=1e-5, atol=1e-5)
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    with encode_images_once(model, batch):
        assert "get_image_features" in vars(inner)
    assert "get_image_features" not in vars(inner)  # the patch is gone after the forward
