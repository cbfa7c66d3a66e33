"""Every supported VLM family, on a tiny model with its real chat-template structure (offline, CPU).

Two properties per family:

* **Sequence fidelity**: prompt + response of :func:`build_group_batch` are the tokens of the
  family's own ``apply_chat_template([user(image, prompt), assistant(response)], tokenize=True)``
  up to and including the end-of-turn token (one BOS, the template's spacing and end-of-turn token;
  PaliGemma, which has no template: the processor's own ``suffix=`` training sequence).
* **Log-probs**: the summed response log-probs of a batched forward (two groups, K = 2 and 3,
  different image sizes) equal a plain per-sequence forward of those template tokens, in every
  mode the trainer runs: vision tower once per group (default), prefix sharing, the ``hidden``
  method, and under LoRA adapters.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vpa_lightning.models import PreferenceGroup, build_group_batch, build_tiny_vlm, family_of, group_logps
from vpa_lightning.models.tiny import TINY_FAMILIES

PROMPTS = ("What is in the image?", "Describe the picture.")
RESPONSES = (("There is a cat.", "A dog on a red sofa."), ("Green grass.", "It is red", "Blue sky with ü"))
#: LLaVA-OneVision's generation prompt ("assistant\n") differs from its template's assistant header
#: ("assistant \n"): the trained prompt is the generation prompt, the response "text<|im_end|>".
GENERATION_PROMPT_DIFFERS = {"llava_onevision"}
#: Vicuna-style templates (LLaVA-NeXT-Video's) write no end-of-turn token after the answer, only a space: the trained
#: answer is the template's answer text, then the tokenizer's EOS, which the model must learn to emit
#: (:meth:`Family.response_text <vpa_lightning.models.families.Family.response_text>`).
EOS_ENDS_THE_ANSWER = {"llava_next_video"}


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _groups() -> list[PreferenceGroup]:
    # a 2:1 image (several crops / patches for InternVL and LLaVA-NeXT) and a square one
    images = (_image(80, 40, 0), _image(40, 40, 1))
    return [PreferenceGroup(images[i], PROMPTS[i], list(RESPONSES[i]), id=f"g{i}") for i in range(2)]


_CACHE: dict[str, tuple] = {}


def _tiny(family: str):
    if family not in _CACHE:
        _CACHE.clear()  # one family's model at a time
        _REFERENCES.clear()
        _CACHE[family] = build_tiny_vlm(family)
    return _CACHE[family]


def template_inputs(processor, image, prompt: str, response: str | None) -> dict:
    """The family's own tokenisation of [user(image(s), prompt)] (+ assistant(response)), as tensors.
    ``image`` is one image or a list of 0..N images."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not family_of(processor).needs_chat_template:  # PaliGemma: the processor's prefix + suffix
        kwargs = {} if response is None else {"suffix": [response]}
        out = processor(text=[processor.image_token * len(images) + prompt], images=[images], return_tensors="pt", **kwargs)
        return {k: v for k, v in out.items() if k != "labels"}
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
    conversation = [{"role": "user", "content": parts}]
    if response is not None:
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=response is None
    )
    return dict(out)


def reference_logps(model, processor, image, prompt: str, response: str) -> tuple[float, int]:
    """Summed log-prob of the response tokens (through the end-of-turn token) with one plain forward
    of the template's own sequence; the count of those tokens."""
    family = family_of(processor)
    n_prompt = template_inputs(processor, image, prompt, None)["input_ids"].shape[1]
    inputs = template_inputs(processor, image, prompt, response)
    ids = inputs["input_ids"][0]
    if type(model).__name__.startswith("LlavaOnevision"):  # see GENERATION_PROMPT_DIFFERS
        raise AssertionError("use the generation prompt for LLaVA-OneVision")
    # the response ends at its end-of-turn token: drop what the template writes after it (whitespace)
    end = ids.shape[0]
    tok = processor.tokenizer
    while end > n_prompt and tok.decode(ids[end - 1 : end]).strip() == "":
        end -= 1
    inputs = {k: (v[:, :end] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == ids.shape[0] else v) for k, v in inputs.items()}
    if family.name in EOS_ENDS_THE_ANSWER:  # the template writes no end-of-turn token: the trained answer ends with EOS
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[tok.eos_token_id]])], dim=1)
        end += 1
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    del family
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
    return logp[n_prompt - 1 :].sum().item(), end - n_prompt


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("trailing", [False, True])
def test_sequence_is_the_chat_template(family, trailing) -> None:
    _, processor = _tiny(family)
    group = _groups()[0]
    batch = build_group_batch(processor, [group], score_trailing_newline=trailing)
    tok = processor.tokenizer
    for row, response in enumerate(group.responses):
        ours = batch.model_inputs["input_ids"][row][batch.model_inputs["attention_mask"][row].bool()].tolist()
        n_prompt = int(batch.prompt_lengths[row])
        prompt = template_inputs(processor, group.image, group.prompt, None)["input_ids"][0].tolist()
        assert ours[:n_prompt] == prompt  # the generation prompt, one BOS
        if tok.bos_token_id is not None:
            assert ours.count(tok.bos_token_id) <= 1
        if family in GENERATION_PROMPT_DIFFERS:
            assert tok.decode(ours[n_prompt:]) == response + "<|im_end|>" + ("\n" if trailing else "")
            continue
        full = template_inputs(processor, group.image, group.prompt, response)["input_ids"][0].tolist()
        if family in EOS_ENDS_THE_ANSWER:  # the template's answer (its trailing space with `trailing`), then EOS
            while not trailing and tok.decode(full[-1:]).strip() == "":
                full = full[:-1]
            assert ours == full + [tok.eos_token_id], tok.convert_ids_to_tokens(ours[n_prompt:])
            continue
        assert ours == full[: len(ours)], (tok.convert_ids_to_tokens(ours[n_prompt:]), tok.convert_ids_to_tokens(full[n_prompt:]))
        rest = tok.decode(full[len(ours) :])
        assert rest == "" if trailing else rest.strip() == "", repr(rest)
        # the response ends with the template's end-of-turn token (then, with `trailing`, its whitespace)
        end = len(ours)
        while tok.decode(ours[end - 1 : end]).strip() == "":
            end -= 1
        assert end == len(ours) or trailing
        assert tok.convert_ids_to_tokens(ours[end - 1]) in tok.all_special_tokens


def test_end_of_turn_tokens_are_the_templates() -> None:
    """Gemma 3 ends turns with <end_of_turn> (not EOS); Idefics3/SmolVLM keep "Assistant: There"."""
    for family, end in [("gemma3", "<end_of_turn>"), ("idefics3", "<end_of_utterance>"), ("mllama", "<|eot_id|>")]:
        _, processor = _tiny(family)
        batch = build_group_batch(processor, _groups()[:1])
        n = int(batch.prompt_lengths[0])
        length = int(batch.model_inputs["attention_mask"][0].sum())
        text = processor.tokenizer.decode(batch.model_inputs["input_ids"][0, n:length])
        assert text.endswith(end) and processor.tokenizer.eos_token not in text, (family, text)
    _, processor = _tiny("smolvlm")
    batch = build_group_batch(processor, _groups()[:1])
    ids = batch.model_inputs["input_ids"][0]
    text = processor.tokenizer.decode(ids[: int(batch.model_inputs["attention_mask"][0].sum())])
    assert "Assistant: There is a cat.<end_of_utterance>" in text


MODES = ["vision_once", "every_row", "prefix_sharing", "hidden", "lora", "lora_prefix_sharing"]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    from vpa_lightning.models import default_lora_targets

    torch.manual_seed(0)
    # init_lora_weights=False: random B, so the adapters change the log-probs
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=default_lora_targets(model), init_lora_weights=False))


_REFERENCES: dict[tuple[str, bool], list[tuple[float, int]]] = {}


def _references(family: str, net, processor, lora: bool) -> list[tuple[float, int]]:
    if (family, lora) not in _REFERENCES:
        refs = []
        for g in _groups():
            for r in g.responses:
                if family in GENERATION_PROMPT_DIFFERS:
                    refs.append(_onevision_reference(net, processor, g, r))
                else:
                    refs.append(reference_logps(net, processor, g.image, g.prompt, r))
        _REFERENCES[(family, lora)] = refs
    return _REFERENCES[(family, lora)]


# all modes of a family in a row: one tiny model (and its references) built at a time
@pytest.mark.parametrize(("family", "mode"), [(f, m) for f in TINY_FAMILIES for m in MODES])
def test_logps_equal_a_plain_forward_of_the_template_tokens(family, mode) -> None:
    model, processor = _tiny(family)
    groups = _groups()
    net = _lora(model) if mode.startswith("lora") else model
    try:
        net.eval()
        batch = build_group_batch(processor, groups)
        with torch.no_grad():
            out = group_logps(
                net,
                batch,
                method="hidden" if mode == "hidden" else "forward",
                share_prefix=mode.endswith("prefix_sharing"),
                share_image=mode != "every_row",
                chunk_size=3,
            )
        expected = _references(family, net, processor, lora=net is not model)
        torch.testing.assert_close(out.sum_logps, torch.tensor([e[0] for e in expected]), rtol=1e-4, atol=1e-4)
        assert out.n_tokens.tolist() == [e[1] for e in expected]
    finally:
        if net is not model:
            net.unload()


def _onevision_reference(model, processor, group, response):
    prompt = template_inputs(processor, group.all_images, group.prompt, None)
    resp = processor.tokenizer(response + "<|im_end|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    n_prompt = prompt["input_ids"].shape[1]
    inputs = dict(prompt)
    inputs["input_ids"] = torch.cat([prompt["input_ids"], resp], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
    return logp[n_prompt - 1 :].sum().item(), resp.shape[1]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generation_prompt_and_greedy_answers(family) -> None:
    """Generation (report callback, `vpa seva`, `vpa eval`) encodes the prompt exactly as training does."""
    from vpa_lightning.models.generation import encode_for_generation, generate_answers

    model, processor = _tiny(family)
    groups = _groups()
    images, questions = [g.image for g in groups], [g.prompt for g in groups]
    inputs = encode_for_generation(processor, images, questions)
    for i, g in enumerate(groups):
        row = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        assert row == template_inputs(processor, g.image, g.prompt, None)["input_ids"][0].tolist()
    answers = generate_answers(model, processor, images, questions, max_new_tokens=3, batch_size=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def _mixed_groups() -> list[PreferenceGroup]:
    """A text-only group, a two-image group and a one-image group, in one batch."""
    a, b = _image(80, 40, 2), _image(40, 40, 3)
    return [
        PreferenceGroup(None, "Say hello.", ["Hello there.", "No."], id="text", images=[]),
        PreferenceGroup(None, "Which one is brighter?", ["The first.", "The second one."], id="two", images=[a, b]),
        PreferenceGroup(b, "What is in the image?", ["A cat.", "A dog."], id="one"),
    ]


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "paligemma"])
def test_text_only_and_multi_image_groups(family) -> None:
    """Text-only and multi-image groups, mixed in one batch, score as a plain forward of their own
    template tokens, with the vision tower once per group, for every row, and with prefix sharing."""
    model, processor = _tiny(family)
    groups = _mixed_groups()
    if family == "mllama":  # no mixed batches (see families/mllama.py): image groups together
        with pytest.raises(ValueError, match="cannot batch text-only"):
            build_group_batch(processor, groups)
        groups = groups[1:]
    batch = build_group_batch(processor, groups)
    assert batch.image_counts.tolist() == [0, 0, 2, 2, 1, 1][6 - 2 * len(groups) :]
    expected = []
    for g in groups:
        for r in g.responses:
            if family in GENERATION_PROMPT_DIFFERS:
                expected.append(_onevision_reference(model, processor, g, r))
            else:
                expected.append(reference_logps(model, processor, g.all_images, g.prompt, r))
    for kwargs in ({}, {"share_image": False}, {"share_prefix": True}):
        with torch.no_grad():
            out = group_logps(model, batch, **kwargs)
        torch.testing.assert_close(out.sum_logps, torch.tensor([e[0] for e in expected]), rtol=1e-4, atol=1e-4, msg=str(kwargs))
    # the same groups in another order (image groups first): rows map to their own group's images
    order = [1, 2, 0] if len(groups) == 3 else [1, 0]
    shuffled = build_group_batch(processor, [groups[i] for i in order])
    with torch.no_grad():
        again = group_logps(model, shuffled).sum_logps
    per_group = list(torch.split(torch.tensor([e[0] for e in expected]), [len(g.responses) for g in groups]))
    torch.testing.assert_close(again, torch.cat([per_group[i] for i in order]), rtol=1e-4, atol=1e-4)
    # a text-only row carries no image: the same log-probs with no pixel inputs at all
    groups = _mixed_groups()
    alone = build_group_batch(processor, groups[:1])
    assert "pixel_values" not in alone.model_inputs
    with torch.no_grad():
        text_only = torch.tensor([reference_logps(model, processor, [], groups[0].prompt, r)[0] for r in groups[0].responses]) \
            if family not in GENERATION_PROMPT_DIFFERS else out.sum_logps[:2]
        torch.testing.assert_close(group_logps(model, alone).sum_logps, text_only, rtol=1e-4, atol=1e-4)


def test_paligemma_refuses_text_only_groups_clearly() -> None:
    _, processor = _tiny("paligemma")
    with pytest.raises(ValueError, match="PaliGemma takes at least one image"):
        build_group_batch(processor, _mixed_groups()[:1])


def test_generation_with_text_only_and_multi_image_questions() -> None:
    from vpa_lightning.models.generation import encode_for_generation, generate_answers

    model, processor = _tiny("qwen2_5_vl")
    groups = _mixed_groups()
    images = [g.all_images for g in groups]
    inputs = encode_for_generation(processor, images, [g.prompt for g in groups])
    for i, g in enumerate(groups):
        row = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        assert row == template_inputs(processor, g.all_images, g.prompt, None)["input_ids"][0].tolist()
    assert len(generate_answers(model, processor, images, [g.prompt for g in groups], max_new_tokens=2)) == 3


INTERLEAVED = "Compare  with : which is older?"  # "Compare <image> with <image>: which is older?" as stored


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_images_sit_where_the_prompt_had_them(family) -> None:
    """A prompt with image offsets is the user turn [text, image, text, image, text]: its tokens are
    the template's own for that interleaved turn (PaliGemma's fixed format: images first, then the
    text as written), and its log-probs a plain forward of them; offsets 0 keep images-first tokens."""
    model, processor = _tiny(family)
    a, b = _image(40, 40, 4), _image(40, 40, 5)
    group = PreferenceGroup(None, INTERLEAVED, ["The first.", "The second."], id="mixed", images=[a, b], image_offsets=[8, 14])
    batch = build_group_batch(processor, [group])
    if family == "paligemma":
        parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": INTERLEAVED}]
    else:
        parts = [{"type": "text", "text": "Compare "}, {"type": "image", "image": a}, {"type": "text", "text": " with "},
                 {"type": "image", "image": b}, {"type": "text", "text": ": which is older?"}]
    for row, response in enumerate(group.responses):
        ours = batch.model_inputs["input_ids"][row][batch.model_inputs["attention_mask"][row].bool()].tolist()
        if family == "paligemma":
            full = template_inputs(processor, [a, b], INTERLEAVED, response)["input_ids"][0].tolist()
        else:
            conversation = [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": response}]}]
            full = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"][0].tolist()
        assert ours == full[: len(ours)] and processor.tokenizer.decode(full[len(ours):]).strip() == ""
    if family != "paligemma":  # the images really moved: not the images-first sequence
        first = build_group_batch(processor, [PreferenceGroup(None, INTERLEAVED, group.responses, images=[a, b])])
        assert first.model_inputs["input_ids"][0].tolist() != batch.model_inputs["input_ids"][0].tolist()
        with torch.no_grad():
            n_prompt = int(batch.prompt_lengths[0])
            conversation = [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": group.responses[0]}]}]
            inputs = dict(processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt"))
            end = int(batch.model_inputs["attention_mask"][0].sum())
            inputs = {k: (v[:, :end] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in inputs.items()}
            logits = model(**inputs).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
            torch.testing.assert_close(group_logps(model, batch).sum_logps[0], logp[n_prompt - 1 :].sum(), rtol=1e-4, atol=1e-4)
        # greedy generation (validation answers, evaluation) prompts the same interleaved turn
        from vpa_lightning.models.generation import encode_for_generation

        gen = encode_for_generation(processor, [[a, b]], [INTERLEAVED], [[8, 14]])
        prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")["input_ids"][0].tolist()
        assert gen["input_ids"][0][gen["attention_mask"][0].bool()].tolist() == prompt
    # offsets of 0 are the images-first turn, token for token
    zero = build_group_batch(processor, [PreferenceGroup(None, INTERLEAVED, group.responses, images=[a, b], image_offsets=[0, 0])])
    plain = build_group_batch(processor, [PreferenceGroup(None, INTERLEAVED, group.responses, images=[a, b])])
    assert zero.model_inputs["input_ids"].tolist() == plain.model_inputs["input_ids"].tolist()
    with pytest.raises(ValueError, match="do not place 2 image"):
        build_group_batch(processor, [PreferenceGroup(None, INTERLEAVED, group.responses, images=[a, b], image_offsets=[14, 8])])


@pytest.mark.parametrize(("family", "feature_layer"), [(f, None) for f in TINY_FAMILIES]
                         + [("llava", -2), ("llava_next", -2), ("llava_onevision", -2), ("llava_next_video", -2)])
def test_unused_parameters_are_exactly_those_without_a_gradient(family, feature_layer) -> None:
    """Family.unused_parameters names exactly the parameters a forward and backward leave without a gradient (DDP
    fails on trainable ones): none missing, none that would have learned. LLaVA-1.5 reads the penultimate vision
    layer (-2): its last layer joins the unused ones."""
    from vpa_lightning.models import family_of, group_logps

    model, processor = build_tiny_vlm(family)
    if feature_layer is not None:
        model.config.vision_feature_layer = feature_layer
    model.train()
    group_logps(model, build_group_batch(processor, _mixed_groups()[-1:]), pack=True).sum_logps.sum().backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert set(family_of(model).unused_parameters(model)) == no_grad
    if feature_layer == -2:
        assert any(".encoder.layers.1." in n for n in no_grad)  # the last of the tiny tower's 2 layers


def test_unused_layers_of_several_feature_layers() -> None:
    """Several feature layers (concatenated features): only the layers past the deepest one are unused."""
    model, _ = build_tiny_vlm("llava")
    family = family_of(model)
    model.config.vision_feature_layer = [-3, -2]
    assert any(".encoder.layers.1." in n for n in family.unused_parameters(model))
    model.config.vision_feature_layer = [0, -1]
    assert not any(".encoder.layers." in n for n in family.unused_parameters(model))
