"""Parsing free-form model answers into yes/no labels and multiple-choice letters.

Both parsers return ``None`` when the answer does not commit to one reading; the metrics count
such answers as wrong (see :mod:`vpa_lightning.eval.metrics`), so a parser that guesses less
never inflates a score.
"""

from __future__ import annotations

import re

__all__ = ["parse_choice", "parse_yes_no"]

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_YES = frozenset({"yes", "yeah", "yep", "yup"})
_NO = frozenset({"no", "nope", "nah"})
# negations that make a statement a "no" when no yes/no word opens the answer
_NEGATION = frozenset(
    {
        "no",
        "not",
        "none",
        "nothing",
        "nobody",
        "never",
        "nowhere",
        "neither",
        "nor",
        "cannot",
    }
)
# hedges: an answer that says it cannot tell is not a "no"
_HEDGES = (
    "not sure",
    "unsure",
    "uncertain",
    "unclear",
    "not clear",
    "cannot tell",
    "can't tell",
    "cannot determine",
    "can't determine",
    "cannot be determined",
    "not possible to determine",
    "not possible to tell",
    "don't know",
    "do not know",
    "difficult to say",
    "hard to say",
    "hard to tell",
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _is_negation(word: str) -> bool:
    return word in _NEGATION or word.endswith("n't")


def parse_yes_no(text: str) -> str | None:
    """``"yes"``, ``"no"`` or ``None`` (no commitment) for a free-form answer to a yes/no question.

    Rule, in order (words are lower-cased, apostrophes kept, ``’`` read as ``'``):

    1. The first word is a yes word (yes/yeah/yep/yup) or a no word (no/nope/nah): that decides
       (``"Yes, there is a dog"`` -> yes, ``"No."`` -> no, ``"No, but there is a cat"`` -> no).
    2. The answer hedges (``"not sure"``, ``"cannot tell"``, ``"hard to say"``, ...): ``None``.
    3. Any negation word (no, not, none, nothing, never, cannot, ``*n't``, ...): no
       (``"There is no dog in the image"``, ``"The dog is not visible"``).
    4. Any yes word later on: yes (``"I would say yes"``).
    5. Otherwise ``None`` (``"I think so"``, ``"There is a dog"``, empty text): a bare statement
       is not read as an answer, unlike the original POPE script that maps everything to yes.
    """
    words = _words(text)
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    flat = " ".join(words)
    if any(re.search(rf"\b{re.escape(h)}\b", flat) for h in _HEDGES):
        return None
    if any(_is_negation(w) for w in words):
        return "no"
    if any(w in _YES for w in words):
        return "yes"
    return None


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def parse_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter (a key of ``options``, e.g. ``"B"``) a free-form answer picks, else ``None``.

    Rule, in order (the first that matches decides):

    1. The answer opens with a letter marker: ``"B"``, ``"b"``, ``"(B) a cat"``, ``"B."``, ``"B:"``,
       ``"B) a cat"``, ``"B, a cat"``. A bare letter followed by a word (``"A cat sits"``) is not a
       marker: it reads as the article.
    2. An explicit phrase: ``"the answer is C"``, ``"Answer: (c)"``, ``"option B"``, ``"choice D"``.
    3. The option text itself: the normalised answer equals one option's text, or exactly one option
       text occurs in it (an option contained in another matched one, e.g. "cat" in "black cat",
       does not count).
    4. Exactly one distinct upper-case option letter stands alone in the answer (``"I pick B"``);
       ``"A"`` followed by a lower-case word (other than or/and/nor) is taken as the article.

    Letters outside ``options`` are never returned.
    """
    letters = {k.upper(): k for k in options}
    s = text.strip()
    if not s or not letters:
        return None

    # 1. leading marker; lower case accepted, the article "A/a word" is not a marker
    m = re.match(r"^\(?([A-Za-z])\s*(?:[\).:,\]]|$)", s) or re.match(
        r"^\(([A-Za-z])\)", s
    )
    if m and m.group(1).upper() in letters:
        return letters[m.group(1).upper()]

    # 2. "answer is C" / "option (b)" / "choice: D"
    for m in re.finditer(
        r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*\(?([A-Za-z])\b(\)?)", s
    ):
        letter, closed = m.group(1), m.group(2)
        tail = s[m.end() :]
        # a lower-case letter must stand alone ("answer is b." / "(b)"), not be an article ("is a cat")
        standalone = letter.isupper() or closed or not re.match(r"\s+[A-Za-z]", tail)
        if standalone and letter.upper() in letters:
            return letters[letter.upper()]

    # 3. the option text
    norm = _norm(re.sub(r"^\(?[A-Za-z][\).:]\s*", "", s))
    texts = {k: _norm(v) for k, v in options.items() if _norm(v)}
    exact = [k for k, t in texts.items() if t == norm]
    if len(exact) == 1:
        return exact[0]
    found = [
        k
        for k, t in texts.items()
        if re.search(rf"(?<![a-z0-9]){re.escape(t)}(?![a-z0-9])", norm)
    ]
    maximal = [
        k
        for k in found
        if not any(
            o != k and texts[k] in texts[o] and texts[o] != texts[k] for o in found
        )
    ]
    if len(maximal) == 1:
        return maximal[0]

    # 4. a lone upper-case letter somewhere
    hits = set()
    for m in re.finditer(r"(?<![A-Za-z])([A-Z])(?![A-Za-z'])", s):
        letter = m.group(1)
        if letter == "A" and re.match(r"\s+(?!(?:or|and|nor)\b)[a-z]", s[m.end() :]):
            continue  # "A cat is ..." / "... and A dog": the article
        if letter in letters:
            hits.add(letter)
    if len(hits) == 1:
        return letters[hits.pop()]
    return None
