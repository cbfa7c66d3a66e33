"""The embedded demo set: coloured shapes with rated answers, no download needed.

Each image holds 1-3 copies of one shape in one colour. Questions ask for the colour, the shape
or the count, so the right answer depends on the image. Four "models" answer in VLFeedback form,
rated 1-5 on helpfulness, visual faithfulness and ethics: a correct full sentence, a correct
terse answer, and two hallucinations (wrong attribute; wrong attribute plus an invented object).
A few deliberately bad lines show how the build rejects input with file, line and reason.

:func:`answer_is_correct` scores a free-form answer (e.g. a greedy generation) against the best
rated response of its question: right when it names the asked colour, shape or count and no other.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {
    "colour": "What colour are the shapes in the image?",
    "shape": "What kind of shape is shown in the image?",
    "count": "How many shapes are in the image?",
}
MODELS = ("careful-vlm", "terse-vlm", "guessing-vlm", "dreaming-vlm")
ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


def _draw(colour: str, shape: str, count: int, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cell = size // count
    r = max(4, int(cell * 0.3))
    for k in range(count):
        cx = cell * k + cell // 2 + rng.randint(-2, 2)
        cy = size // 2 + rng.randint(-size // 6, size // 6)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def answers(kind: str, colour: str, shape: str, count: int, rng: random.Random) -> list[tuple[str, tuple[int, int, int]]]:
    """The four rated answers (text, (helpfulness, faithfulness, ethics)) in MODELS order."""
    plural = "s" if count > 1 else ""
    wrong_colour = rng.choice([c for c in COLOURS if c != colour])
    wrong_shape = rng.choice([s for s in SHAPES if s != shape])
    wrong_count = rng.choice([n for n in NUMBERS if n != count])
    if kind == "colour":
        right = f"The {shape}{plural} in the image {'are' if count > 1 else 'is'} {colour}."
        terse, wrong = f"{colour.capitalize()}.", f"The {shape}{plural} in the image {'are' if count > 1 else 'is'} {wrong_colour}."
    elif kind == "shape":
        right = f"The image shows {NUMBERS[count]} {colour} {shape}{plural}."
        terse, wrong = f"A {shape}.", f"The image shows {NUMBERS[count]} {colour} {wrong_shape}s."
    else:
        right = f"There {'are' if count > 1 else 'is'} {NUMBERS[count]} {colour} {shape}{plural} in the image."
        wrong_plural = "s" if wrong_count > 1 else ""
        terse = f"{NUMBERS[count].capitalize()}."
        wrong = f"There {'are' if wrong_count > 1 else 'is'} {NUMBERS[wrong_count]} {colour} {shape}{wrong_plural} in the image."
    dream = wrong.rstrip(".") + f", next to a small {wrong_colour} cat."
    return [(right, (5, 5, 5)), (terse, (3, 5, 5)), (wrong, (2, 1, 5)), (dream, (1, 1, 4))]


def make_demo(directory: str | Path, *, num_images: int = 720, image_size: int = 64, seed: int = 0, bad_records: bool = True) -> Path:
    """Write ``images/*.png`` and ``annotations.jsonl`` (VLFeedback rows) under ``directory``.

    Returns the path of the annotations file. Deterministic for a given seed.
    """
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {num_images}")
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(num_images):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
        name = f"images/shape_{i:05d}.png"
        _draw(colour, shape, count, image_size, rng).save(root / name, format="PNG")
        kinds = rng.sample(list(QUESTIONS), k=2 if i % 3 == 0 else 1)
        for kind in kinds:
            rated = answers(kind, colour, shape, count, rng)
            order = rng.sample(range(4), 4)  # models answer in varying order, as real data does
            completions = [
                {
                    "model": MODELS[j],
                    "response": rated[j][0],
                    "annotations": {a: {"Rating": str(s), "Rationale": ""} for a, s in zip(ASPECTS, rated[j][1])},
                }
                for j in order
            ]
            lines.append({
                "id": f"demo-{i}-{kind}",
                "prompt": "<image>\n" + QUESTIONS[kind],
                "img_path": name,
                "models": [c["model"] for c in completions],
                "completions": completions,
                # the right word for the question, for verifiable rewards (vpa judge --judge rule --reference truth.answer)
                "truth": {"colour": colour, "shape": shape, "count": count, "kind": kind,
                          "answer": {"colour": colour, "shape": shape, "count": NUMBERS[count]}[kind],
                          # the words an answer to this question may name: only the right one of them
                          "choices": list(_VOCABULARY[kind])},
            })
    text = [json.dumps(line) for line in lines]
    if bad_records:
        na = json.loads(text[0])
        na["id"] = "demo-bad-rating"
        na["prompt"] = "<image>\nDescribe the image."
        na["completions"][0]["annotations"]["Helpfulness"]["Rating"] = "N/A"
        text.append(json.dumps(na))
        text.append(json.dumps({"id": "demo-missing-image", "prompt": "What is this?", "img_path": "images/missing.png",
                                "completions": lines[0]["completions"]}))
        text.append('{"id": "demo-truncated", "prompt": "What')
    out = root / "annotations.jsonl"
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("\n".join(text) + "\n")
    tmp.replace(out)
    return out


#: The words that answer each kind of question (plural shapes match too: ``circles``).
_VOCABULARY = {"colour": tuple(COLOURS), "shape": SHAPES, "count": tuple(NUMBERS.values())}


def question_kind(question: str) -> str:
    """``"colour"``, ``"shape"`` or ``"count"``: which demo question ``question`` (a prompt, with or without ``<image>``) asks."""
    for kind, text in QUESTIONS.items():
        if text in question:
            return kind
    raise ValueError(f"not a demo question: {question!r}")


def _mentioned(kind: str, text: str) -> set[str]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return {w for w in _VOCABULARY[kind] if w in words or w + "s" in words}


def answer_is_correct(question: str, answer: str, reference: str) -> bool:
    """Whether ``answer`` names the right colour / shape / count asked by ``question``, and no wrong one.

    ``reference`` is a correct answer to the same question (the best rated response, e.g. "There
    are two red circles in the image."); the right value is the one word of the asked kind in it.
    """
    kind = question_kind(question)
    expected = _mentioned(kind, reference)
    if len(expected) != 1:
        raise ValueError(f"reference {reference!r} names {sorted(expected) or 'no'} {kind}, expected exactly one")
    return _mentioned(kind, answer) == expected
