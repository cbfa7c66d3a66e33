"""POPE / MME / MMBench readers: items, prompts, rotations, and every bad line reported by line.

The writers here are reused by ``test_runner.py`` for the end-to-end run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpa_lightning.eval.base import EvalItem
from vpa_lightning.eval.benchmarks import (
    BENCHMARKS,
    MME,
    POPE,
    MMBench,
    MVBench,
    build_benchmark,
)


def make_images(root: Path, n: int = 4) -> Path:
    """``img0.png`` .. small RGB images, plus ``broken.png`` (PNG header, garbage body)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24 + 2 * i, 20 + i), (50 * i, 200 - 40 * i, 90)).save(
            root / f"img{i}.png"
        )
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    )
    return path


def write_pope(path: Path) -> Path:
    return write_lines(
        path,
        [
            {
                "question_id": 1,
                "image": "img0.png",
                "text": "Is there a dog in the image?",
                "label": "yes",
            },
            {
                "question_id": 2,
                "image": "img1.png",
                "text": "Is there a cat in the image?",
                "label": "no",
            },
            {
                "question_id": 3,
                "image": "img2.png",
                "text": "Is there a car in the image?",
                "label": "Yes",
            },
            {
                "question_id": 4,
                "image": "img3.png",
                "text": "Is there a bus in the image?",
                "label": "no",
            },
            "{not json",  # line 5
            {"question_id": 6, "image": "img0.png", "label": "yes"},  # line 6: no text
            {
                "question_id": 7,
                "image": "img0.png",
                "text": "Is there a cow?",
                "label": "maybe",
            },  # line 7
            {
                "question_id": 8,
                "image": "missing.png",
                "text": "Is there a cow?",
                "label": "no",
            },  # line 8
            {
                "question_id": 9,
                "image": "broken.png",
                "text": "Is there a cow?",
                "label": "no",
            },  # line 9
            {
                "question_id": 1,
                "image": "img1.png",
                "text": "Again?",
                "label": "no",
            },  # line 10: duplicate id
        ],
    )


def write_mme(path: Path) -> Path:
    def q(qid: str, image: str, answer: str, category: str) -> dict[str, str]:
        return {
            "question_id": qid,
            "image": image,
            "question": f"Is this question {qid} true? Please answer yes or no.",
            "answer": answer,
            "category": category,
        }

    return write_lines(
        path,
        [
            q("e0a", "img0.png", "Yes", "existence"),
            q("e0b", "img0.png", "No", "existence"),
            q("c1a", "img1.png", "Yes", "code_reasoning"),
            q("c1b", "img1.png", "No", "code_reasoning"),
            q("bad", "img2.png", "Perhaps", "existence"),  # line 5
            {
                "question_id": "nocat",
                "image": "img2.png",
                "question": "Q?",
                "answer": "Yes",
            },  # line 6
        ],
    )


MMBENCH_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
]


def write_mmbench_tsv(path: Path) -> Path:
    rows = [
        [
            "10",
            "What animal is shown?",
            "Look closely.",
            "dog",
            "cat",
            "bird",
            "",
            "B",
            "animals",
            "img0.png",
        ],
        [
            "11",
            "Which colour dominates?",
            "nan",
            "red",
            "green",
            "blue",
            "white",
            "D",
            "colours",
            "img1.png",
        ],
        [
            "12",
            "Odd answer",
            "",
            "x",
            "y",
            "",
            "",
            "C",
            "animals",
            "img2.png",
        ],  # line 4: C not an option
        [
            "13",
            "No image",
            "",
            "x",
            "y",
            "",
            "",
            "A",
            "animals",
            "nowhere.png",
        ],  # line 5
        [
            "14",
            "",
            "",
            "x",
            "y",
            "",
            "",
            "A",
            "animals",
            "img2.png",
        ],  # line 6: empty question
    ]
    path.write_text(
        "\t".join(MMBENCH_HEADER) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
    )
    return path


def test_registry() -> None:
    assert BENCHMARKS == {"pope": POPE, "mme": MME, "mmbench": MMBench, "mvbench": MVBench}
    b = build_benchmark({"name": "pope", "file": "x/coco_pope_adversarial.json"})
    assert (
        isinstance(b, POPE)
        and b.split == "adversarial"
        and b.display_name == "pope_adversarial"
    )
    b = build_benchmark(
        {
            "class_path": "vpa_lightning.eval.benchmarks.MME",
            "init_args": {"file": "m.jsonl"},
        }
    )
    assert isinstance(b, MME)
    with pytest.raises(ValueError, match="unknown benchmark"):
        build_benchmark({"name": "nope", "file": "x"})


def test_pope(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs")
    items, rejects = POPE(
        str(write_pope(tmp_path / "pope.jsonl")),
        image_root=str(tmp_path / "imgs"),
        split="random",
    ).load()
    assert [it.item_id for it in items] == ["1", "2", "3", "4"]
    assert [it.meta["label"] for it in items] == ["yes", "no", "yes", "no"]
    assert items[0].image == tmp_path / "imgs" / "img0.png"
    assert (
        items[0].question
        == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    by_line = {r.line: r.reason for r in rejects}
    assert sorted(by_line) == [5, 6, 7, 8, 9, 10]
    assert "malformed JSON" in by_line[5]
    assert "missing field 'text'" in by_line[6]
    assert "label must be yes or no" in by_line[7]
    assert "image not found" in by_line[8]
    assert "unreadable image" in by_line[9]
    assert "duplicate id" in by_line[10]
    assert all(r.file == str(tmp_path / "pope.jsonl") for r in rejects)


def test_pope_scores_parsed_answers(tmp_path: Path) -> None:
    make_images(tmp_path)
    bench = POPE(
        str(write_pope(tmp_path / "pope.jsonl"))
    )  # image root defaults to the file's folder
    items, _ = bench.load()
    # labels yes,no,yes,no; answers parse to yes, no, no, None -> TP 1, TN 1, FN 1, unparsed (label no) -> FP
    m = bench.score(items, ["Yes, there is.", "No.", "There is no car.", "Hmm"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(0.25)


def test_mme(tmp_path: Path) -> None:
    make_images(tmp_path)
    bench = MME(str(write_mme(tmp_path / "mme.jsonl")))
    items, rejects = bench.load()
    assert [it.item_id for it in items] == ["e0a", "e0b", "c1a", "c1b"]
    # "Please answer yes or no." is replaced by the short-answer hint
    assert (
        items[0].question
        == "Is this question e0a true?\nAnswer the question using a single word or phrase."
    )
    assert {r.line: r.reason for r in rejects} == {
        5: "answer must be Yes or No, got 'Perhaps'",
        6: "missing field 'category'",
    }
    m = bench.score(items, ["Yes", "Yes", "yes", "no"])
    # existence: acc 1/2, acc+ 0 -> 50; code_reasoning: acc 1, acc+ 1 -> 200
    assert m["existence/score"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(50.0) and m["cognition"] == pytest.approx(
        200.0
    )


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_mmbench_rotations(tmp_path: Path, fmt: str) -> None:
    make_images(tmp_path)
    path = write_mmbench_tsv(tmp_path / "mmb.tsv")
    if (
        fmt == "jsonl"
    ):  # same rows as JSON objects (the first-row hint as a missing key)
        lines = path.read_text().splitlines()
        rows = [dict(zip(MMBENCH_HEADER, line.split("\t"))) for line in lines[1:]]
        del rows[0]["hint"]
        rows[0]["hint"] = "Look closely."
        path = write_lines(tmp_path / "mmb.jsonl", rows)
    items, rejects = MMBench(str(path)).load()
    # q10 has 3 options -> 3 rotations; q11 has 4 -> 4
    assert [it.item_id for it in items] == [
        "10#rot0",
        "10#rot1",
        "10#rot2",
        "11#rot0",
        "11#rot1",
        "11#rot2",
        "11#rot3",
    ]
    first_line = 2 if fmt == "tsv" else 1  # TSV line 1 is the header
    assert (
        items[0].meta["line"] == first_line and items[3].meta["line"] == first_line + 1
    )
    assert items[0].question == (
        "Look closely.\nWhat animal is shown?\nA. dog\nB. cat\nC. bird\n"
        "Answer with the option's letter from the given choices directly."
    )
    # rotation 1: A=cat, B=bird, C=dog -> the answer "cat" is A; rotation 2: A=bird, B=dog, C=cat -> C
    assert items[1].meta["options"] == {"A": "cat", "B": "bird", "C": "dog"}
    assert [it.meta["answer"] for it in items[:3]] == ["B", "A", "C"]
    # q11 answer D (white): rotations 0..3 -> D, C, B, A; hint "nan" dropped
    assert [it.meta["answer"] for it in items[3:]] == ["D", "C", "B", "A"]
    assert items[3].question.startswith("Which colour dominates?\nA. red")
    reasons = {
        r.line - first_line + 2: r.reason for r in rejects
    }  # in TSV line numbers
    assert "not among the options" in reasons[4]
    assert "image not found" in reasons[5]
    assert "missing field 'question'" in reasons[6]
    assert len(rejects) == 3

    # circular scoring: q10 all right, q11 right except rotation 2 -> circular 1/2, vanilla 2/2
    answers = ["B", "(A) cat", "cat", "D", "C.", "A", "A"]
    m = MMBench(str(path)).score(items, answers)
    assert m["circular_acc"] == pytest.approx(0.5)
    assert m["vanilla_acc"] == pytest.approx(1.0)
    assert m["circular_acc/animals"] == pytest.approx(1.0) and m[
        "circular_acc/colours"
    ] == pytest.approx(0.0)


def test_mmbench_not_circular(tmp_path: Path) -> None:
    make_images(tmp_path)
    items, _ = MMBench(
        str(write_mmbench_tsv(tmp_path / "m.tsv")), circular=False
    ).load()
    assert [it.item_id for it in items] == ["10#rot0", "11#rot0"]


def test_missing_file_is_a_reject(tmp_path: Path) -> None:
    items, rejects = POPE(str(tmp_path / "nothing.jsonl")).load()
    assert items == [] and len(rejects) == 1 and "cannot read file" in rejects[0].reason


def test_items_are_eval_items(tmp_path: Path) -> None:
    make_images(tmp_path)
    items, _ = POPE(str(write_pope(tmp_path / "p.jsonl"))).load()
    assert all(isinstance(it, EvalItem) and it.image.is_absolute() for it in items)
