"""Judge-scored benchmarks (MM-Vet, LLaVA-Bench, MMHal-Bench) against the stub judge.

The stub replies with whatever the model answer carries between ``[[`` and ``]]`` (``~`` stands
for a newline), so each test sets the judge's verdict per item and checks the metrics by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.eval_judge.test_judge import StubJudge
from vpa_lightning.eval.base import Benchmark
from vpa_lightning.eval.judged import (
    JUDGED_BENCHMARKS,
    LLaVABench,
    MMHalBench,
    MMVet,
    parse_llava_scores,
    parse_mmhal_rating,
    parse_mmvet_score,
)

_VERDICT = re.compile(r"\[\[(.*?)\]\]")


def _scripted(body: dict[str, Any]) -> str:
    """The verdict planted in the model answer (the last ``[[...]]`` of the judge prompt)."""
    found = _VERDICT.findall(body["messages"][-1]["content"])
    return found[-1].replace("~", "\n") if found else "no verdict"


@pytest.fixture
def judge_stub() -> Iterator[StubJudge]:
    server = StubJudge(reply=_scripted)
    yield server
    server.close()


def _images(root: Path, *names: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"\x89PNG fake")  # load() only checks the file exists


def _rejects(rejects: list) -> list[tuple[int, str]]:
    return [(r.line, r.reason.split(":")[0].split(" '")[0]) for r in rejects]


def test_registry() -> None:
    assert set(JUDGED_BENCHMARKS) == {"mmvet", "llava_bench", "mmhal"}
    for name, cls in JUDGED_BENCHMARKS.items():
        assert issubclass(cls, Benchmark) and cls.name == name


def test_parsers() -> None:
    assert parse_mmvet_score("0.7") == 0.7 and parse_mmvet_score(" 1.0\n") == 1.0
    assert parse_mmvet_score("7") is None and parse_mmvet_score("no idea") is None
    assert parse_llava_scores("8 7\nbecause") == (8.0, 7.0) and parse_llava_scores("8, 7.5") == (8.0, 7.5)
    assert parse_llava_scores("Assistant 1: 8\nAssistant 2: 7") is None
    assert parse_mmhal_rating("blah\nRating: 4") == 4 and parse_mmhal_rating("**Rating:** 5") == 5
    assert parse_mmhal_rating("rating: 1 ... corrected. Rating: 3") == 3  # the last one is the verdict
    assert parse_mmhal_rating("Rating: 7") is None and parse_mmhal_rating("score 4") is None


def test_mmvet_json(tmp_path: Path, judge_stub: StubJudge) -> None:
    _images(tmp_path / "images", "v1_0.png", "v1_1.png", "v1_2.png", "v1_3.png", "v1_4.png")
    data = {
        "v1_0": {"imagename": "v1_0.png", "question": "Q0", "answer": "A0", "capability": ["rec", "ocr"]},
        "v1_1": {"imagename": "v1_1.png", "question": "Q1", "answer": "A1 <AND> B1", "capability": ["rec", "know"]},
        "v1_2": {"imagename": "v1_2.png", "question": "Q2", "answer": "A2", "capability": ["ocr", "math"]},
        "v1_3": {"imagename": "v1_3.png", "question": "Q3", "answer": "A3", "capability": ["math"]},
        "v1_4": {"imagename": "v1_4.png", "question": "Q4", "capability": ["rec"]},  # no answer
        "v1_5": {"imagename": "gone.png", "question": "Q5", "answer": "A5", "capability": ["gen"]},
    }
    path = tmp_path / "mm-vet.json"
    path.write_text(json.dumps(data))
    bench = MMVet(path, tmp_path / "images", judge=judge_stub.client(tmp_path / "cache"))
    items, rejects = bench.load()
    assert [i.item_id for i in items] == ["v1_0", "v1_1", "v1_2", "v1_3"]
    assert items[0].image == (tmp_path / "images" / "v1_0.png").resolve() and items[0].question == "Q0"
    assert _rejects(rejects) == [(5, "missing field answer"), (6, "image not found")]  # 1-based entry index
    assert all(r.file == str(path) for r in rejects)

    answers = ["yes [[1.0]]", "half [[0.5]]", "wrong [[0.0]]", "?? [[I cannot grade this]]"]
    metrics = bench.score(items, answers)
    # scores 1.0, 0.5, 0.0, unparsed -> 0.0
    # rec  = items 0,1 = (1.0 + 0.5) / 2 = 0.75 -> 75
    # ocr  = items 0,2 = (1.0 + 0.0) / 2 -> 50;  know = item 1 -> 50;  math = items 2,3 = 0 -> 0
    # total = (1.0 + 0.5 + 0.0 + 0.0) / 4 = 0.375 -> 37.5;  gen/spat: no item, not reported
    assert metrics == pytest.approx({"rec": 75.0, "ocr": 50.0, "know": 50.0, "math": 0.0, "total": 37.5, "unparsed": 1.0})
    prompts = [r["body"]["messages"][0]["content"] for r in judge_stub.requests]  # arrival order varies
    prompt = next(p for p in prompts if "half [[0.5]]" in p)
    assert prompt.rstrip().endswith("Q1 | A1 <AND> B1 | half [[0.5]] |")  # few-shot table, item last
    assert "<OR>" in prompt and prompt.count("\n---") == 1

    # Rerun: every judgement from the cache, the server sees nothing new.
    sent = len(judge_stub.requests)
    assert bench.score(items, answers) == metrics and len(judge_stub.requests) == sent


def test_mmvet_jsonl_bad_lines(tmp_path: Path, judge_stub: StubJudge) -> None:
    _images(tmp_path, "a.png", "b.png")
    lines = [
        json.dumps({"question_id": "a", "image": "a.png", "question": "Qa", "answer": "x", "capability": "ocr"}),
        '{"question_id": "b", "image": ',  # malformed
        "",  # blank lines are skipped, not rejected
        json.dumps({"question_id": "b", "image": "b.png", "question": "Qb", "answer": "y"}),  # no capability
        json.dumps({"question_id": "a", "image": "b.png", "question": "Qc", "answer": "z", "capability": ["rec"]}),
        "[1, 2]",
    ]
    path = tmp_path / "mmvet.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items, rejects = MMVet(path, judge=judge_stub.client(tmp_path / "c")).load()  # image_root = file's folder
    assert [(i.item_id, i.meta["capability"]) for i in items] == [("a", ["ocr"])]
    assert _rejects(rejects) == [
        (2, "malformed JSON"),
        (4, "missing field capability"),
        (5, "duplicate id"),
        (6, "not a JSON object"),
    ]


def test_llava_bench(tmp_path: Path, judge_stub: StubJudge) -> None:
    _images(tmp_path / "img", "001.jpg", "002.jpg", "003.jpg")
    rows = [
        {"question_id": 0, "image": "001.jpg", "question": "Q0", "category": "conv", "gpt4_answer": "R0", "caption": "a dog"},
        {"question_id": 1, "image": "001.jpg", "text": "Q1", "category": "conv", "reference": "R1"},
        {"question_id": 2, "image": "002.jpg", "question": "Q2", "category": "detail", "gpt4_answer": "R2"},
        {"question_id": 3, "image": "003.jpg", "question": "Q3", "category": "complex", "gpt4_answer": "R3"},
        {"question_id": 4, "image": "003.jpg", "question": "Q4", "category": "weird", "gpt4_answer": "R4"},
        {"question_id": 5, "image": "404.jpg", "question": "Q5", "category": "conv", "gpt4_answer": "R5"},
    ]
    path = tmp_path / "llava_bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    bench = LLaVABench(path, tmp_path / "img", judge=judge_stub.client(tmp_path / "cache"))
    items, rejects = bench.load()
    assert [i.item_id for i in items] == ["0", "1", "2", "3"]
    assert [i.meta["category"] for i in items] == ["conversation", "conversation", "detail", "complex"]
    assert _rejects(rejects) == [(5, "unknown category"), (6, "image not found"), (7, "malformed JSON")]

    answers = ["m0 [[8 6~explanation]]", "m1 [[10 10]]", "m2 [[5 4]]", "m3 [[Assistant 2 is better]]"]
    metrics = bench.score(items, answers)
    # (reference, model): (8,6) (10,10) (5,4), unparsed -> (10,0)
    # conversation: mean model (6+10)/2 = 8, mean ref (8+10)/2 = 9 -> 8/9*100 = 88.888...
    # detail: 4/5*100 = 80;  complex: 0/10*100 = 0
    # all: model (6+10+4+0)/4 = 5, ref (8+10+5+10)/4 = 8.25 -> 5/8.25*100 = 60.6060...
    assert metrics == pytest.approx(
        {
            "relative_conversation": 800 / 9,
            "relative_detail": 80.0,
            "relative_complex": 0.0,
            "relative": 500 / 8.25,
            "model_score": 5.0,
            "reference_score": 8.25,
            "unparsed": 1.0,
        }
    )
    body = next(r["body"] for r in judge_stub.requests if "m0 [[" in json.dumps(r["body"]))
    assert body["messages"][0]["role"] == "system"
    user = body["messages"][1]["content"]
    # Reference is Assistant 1, model answer Assistant 2 (the "s1 s2" order the parser relies on).
    assert user.index("R0") < user.index("[Assistant 2]") < user.index("m0 [[8 6")
    assert "[Context]\na dog" in user and "[Question]\nQ0" in user


def test_mmhal(tmp_path: Path, judge_stub: StubJudge) -> None:
    _images(tmp_path / "images", "x1.jpg", "x2.jpg", "x3.jpg")
    base = {"question_topic": "t", "image_id": "i", "model_answer": ""}
    records = [
        {**base, "question_type": "attribute", "image_src": "https://host/p/x1.jpg", "image_content": ["Cat", "Sofa"],
         "question": "Q0", "gt_answer": "G0"},
        {**base, "question_type": "attribute", "image_src": "https://host/p/x2.jpg", "image_content": [],
         "question": "Q1", "gt_answer": "G1"},
        {**base, "question_type": "counting", "image": "x3.jpg", "question": "Q2", "gt_answer": "G2"},
        {**base, "question_type": "counting", "image_src": "https://host/x3.jpg", "question": "Q3", "gt_answer": "G3"},
        {**base, "question_type": "counting", "image_src": "https://host/x3.jpg", "question": "Q4"},  # no gt_answer
        {**base, "question_type": "other", "image_src": "https://host/missing.jpg", "question": "Q5", "gt_answer": "G"},
    ]
    path = tmp_path / "response_template.json"
    path.write_text(json.dumps(records, indent=1))
    bench = MMHalBench(path, tmp_path / "images", judge=judge_stub.client(tmp_path / "cache"))
    items, rejects = bench.load()
    assert [i.question for i in items] == ["Q0", "Q1", "Q2", "Q3"]
    assert [i.item_id for i in items] == ["1", "2", "3", "4"]  # no id field: 1-based position
    assert _rejects(rejects) == [(5, "missing field gt_answer/answer"), (6, "image not found")]

    answers = ["[[good~Rating: 5]]", "[[made up~Rating: 2]]", "[[Rating: 6]]", "[[I refuse]]"]
    metrics = bench.score(items, answers)
    # ratings 5, 2, 6, unparsed -> 0
    # avg = (5+2+6+0)/4 = 3.25; hallucination = #(rating<3) / 4 = #{2, 0} / 4 = 0.5
    # attribute = (5+2)/2 = 3.5; counting = (6+0)/2 = 3.0
    assert metrics == pytest.approx(
        {"score_attribute": 3.5, "score_counting": 3.0, "avg_score": 3.25, "hallucination_rate": 0.5, "unparsed": 1.0}
    )
    prompt = next(r["body"]["messages"][0]["content"] for r in judge_stub.requests if "good~" in json.dumps(r["body"]))
    assert "[Image Contents]\nCat, Sofa" in prompt and "[Standard Human-Generated Answer]\nG0" in prompt
    assert "Rating: N" in prompt


def test_score_length_mismatch(tmp_path: Path, judge_stub: StubJudge) -> None:
    _images(tmp_path, "a.png")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"question_id": "a", "image": "a.png", "question": "q", "answer": "x", "capability": ["rec"]}))
    bench = MMVet(path, judge=judge_stub.client(tmp_path / "c"))
    items, _ = bench.load()
    with pytest.raises(ValueError, match="1 items but 0 answers"):
        bench.score(items, [])


def test_load_without_judge_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load() needs no judge configuration; the client is built only when score() runs."""
    for var in ("VPA_JUDGE_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    _images(tmp_path, "a.png")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"question_id": "a", "image": "a.png", "question": "q", "answer": "x", "capability": ["rec"]}))
    bench = MMVet(path)
    items, _ = bench.load()
    from vpa_lightning.eval.judge import JudgeConfigError

    with pytest.raises(JudgeConfigError, match="VPA_JUDGE_BASE_URL"):
        bench.score(items, ["x"])
