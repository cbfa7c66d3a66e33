"""Scoring free-form answers to the demo questions (``vpa_lightning.data.demo.answer_is_correct``)."""

from __future__ import annotations

import pytest

from vpa_lightning.data.demo import QUESTIONS, answer_is_correct, question_kind


def test_question_kind():
    assert question_kind("<image>\n" + QUESTIONS["count"]) == "count"
    with pytest.raises(ValueError):
        question_kind("Describe the image.")


@pytest.mark.parametrize(
    "kind, reference, answer, ok",
    [
        ("colour", "The squares in the image are blue.", "Blue.", True),
        ("colour", "The squares in the image are blue.", "The squares are red.", False),
        ("colour", "The squares in the image are blue.", "blue or red", False),
        ("shape", "The image shows two red circles.", "A circle.", True),
        ("shape", "The image shows two red circles.", "Two red squares.", False),
        ("count", "There are three red circles in the image.", "Three.", True),
        ("count", "There are three red circles in the image.", "There is one red circle.", False),
        ("count", "There are three red circles in the image.", "\ufffdogs< car2ogs", False),
    ],
)
def test_answer_is_correct(kind, reference, answer, ok):
    assert answer_is_correct(QUESTIONS[kind], answer, reference) is ok
