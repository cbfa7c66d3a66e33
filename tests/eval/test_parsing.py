"""Free-form answer parsing: yes/no and multiple-choice letters."""

from __future__ import annotations

import pytest

from vpa_lightning.eval.parsing import parse_choice, parse_yes_no


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, there is a dog", "yes"),
        ("YES!", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("No, but there is a cat.", "no"),  # first word decides
        ("Yes, there is no cat but a dog.", "yes"),
        ("There is no dog in the image", "no"),
        ("The dog is not visible.", "no"),
        ("There isn’t a dog.", "no"),  # curly apostrophe
        ("I would say yes.", "yes"),
        ("I think so", None),
        ("There is a dog", None),  # bare statement: not read as yes
        ("I'm not sure.", None),  # hedge, not a "no"
        ("It is hard to say", None),
        ("", None),
        ("   ", None),
        ("Norway", None),  # "no" only as a whole word
        ("I know", None),
    ],
)
def test_parse_yes_no(text: str, expected: str | None) -> None:
    assert parse_yes_no(text) == expected


OPTS = {"A": "a dog", "B": "a cat", "C": "a bird", "D": "a black cat"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(B) a cat", "B"),
        ("(b)", "B"),
        ("C) a bird", "C"),
        ("D: a black cat", "D"),
        ("The answer is C", "C"),
        ("The answer is C because birds fly.", "C"),
        ("answer: (c)", "C"),
        ("Option D.", "D"),
        ("a bird", "C"),  # option text itself
        ("A bird.", "C"),  # article, not the letter A
        ("It is a black cat.", "D"),  # "cat" inside "black cat" does not compete
        ("I pick B here", "B"),
        (
            "The answer is a dog",
            "A",
        ),  # lower-case "a" followed by a word is the article
        ("E", None),  # not an option
        ("something else", None),
        ("A or B", None),  # two letters
        ("", None),
    ],
)
def test_parse_choice(text: str, expected: str | None) -> None:
    assert parse_choice(text, OPTS) == expected


def test_parse_choice_ignores_letters_not_offered() -> None:
    assert parse_choice("C", {"A": "yes", "B": "no"}) is None
    assert parse_choice("A", {"A": "yes", "B": "no"}) == "A"
