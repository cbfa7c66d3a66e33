"""Rule-scored benchmarks: POPE, MME and MMBench (circular), read from local files.

Every class takes the benchmark file, an optional ``image_root`` (relative image paths are
resolved against it; default: the benchmark file's folder) and an answer-format hint appended to
the question. :meth:`~vpa_lightning.eval.base.Benchmark.load` never raises on content: each bad
line (malformed JSON, missing field, bad label, answer not among the options, missing or
unreadable image, duplicate id) becomes a :class:`~vpa_lightning.eval.base.Reject` with its
1-based line number. Items carry ``meta["group"]`` (what must stay together when a run is
limited: an MME image's two questions, an MMBench question's rotations) and
``meta["file"]`` / ``meta["line"]``.

:data:`BENCHMARKS` maps the YAML name (``pope``, ``mme``, ``mmbench``) to the class; other
modules add theirs with :func:`register`.
"""

from __future__ import annotations

import csv
import json
import math
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from vpa_lightning.eval.base import Benchmark, EvalItem, Reject
from vpa_lightning.eval.metrics import mmbench_metrics, mme_metrics, pope_metrics
from vpa_lightning.eval.parsing import parse_choice, parse_yes_no

__all__ = ["BENCHMARKS", "MME", "POPE", "MMBench", "build_benchmark", "register"]

SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."
CHOICE_HINT = "Answer with the option's letter from the given choices directly."
POPE_SPLITS = ("random", "popular", "adversarial")

#: YAML ``name`` -> Benchmark class.
BENCHMARKS: dict[str, type[Benchmark]] = {}

B = TypeVar("B", bound=type[Benchmark])


def register(cls: B) -> B:
    """Class decorator: make ``cls`` available under ``cls.name`` in :data:`BENCHMARKS`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    BENCHMARKS[cls.name] = cls
    return cls


def build_benchmark(spec: dict[str, Any]) -> Benchmark:
    """A benchmark from ``{"name": "pope", <init args>...}`` or ``{"class_path": "pkg.mod.Cls", "init_args": {...}}``."""
    spec = dict(spec)
    if "class_path" in spec:
        import importlib

        module, _, cls_name = str(spec.pop("class_path")).rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        kwargs = dict(spec.pop("init_args", None) or {})
        if spec:
            raise ValueError(
                f"unexpected keys beside class_path/init_args: {sorted(spec)}"
            )
    else:
        from vpa_lightning.eval.judged import JUDGED_BENCHMARKS  # stdlib-only: cheap to import

        for judged in JUDGED_BENCHMARKS.values():
            BENCHMARKS.setdefault(judged.name, judged)
        name = spec.pop("name", None)
        if name not in BENCHMARKS:
            raise ValueError(
                f"unknown benchmark name {name!r}; known: {sorted(BENCHMARKS)} (or use class_path)"
            )
        cls, kwargs = BENCHMARKS[name], spec
    if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
        raise TypeError(f"{cls!r} is not a Benchmark subclass")
    return cls(**kwargs)


class _Bad(Exception):
    """A line that cannot be used (internal: becomes a Reject)."""


class _FileBenchmark(Benchmark):
    """Shared file reading, image checking and naming of the rule-scored benchmarks."""

    def __init__(
        self, file: str, image_root: str | None = None, prompt_hint: str = ""
    ) -> None:
        self.file = str(file)
        self.image_root = Path(image_root) if image_root else Path(self.file).parent
        self.prompt_hint = prompt_hint
        self._image_ok: dict[Path, str | None] = {}

    @property
    def display_name(self) -> str:
        """Key of this benchmark in results (unique per run; the runner de-duplicates otherwise)."""
        return self.name

    # --- reading -------------------------------------------------------------------------
    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        """``(line, row, error)`` per non-blank JSONL line; ``row`` is ``None`` with an error."""
        with open(self.file, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as e:
                    yield lineno, None, f"malformed JSON: {e.msg}"
                    continue
                if not isinstance(row, dict):
                    yield lineno, None, "not a JSON object"
                    continue
                yield lineno, row, ""

    def load(self) -> tuple[list[EvalItem], list[Reject]]:
        items: list[EvalItem] = []
        rejects: list[Reject] = []
        seen: set[str] = set()
        try:
            rows = list(self._rows())
        except (OSError, UnicodeDecodeError) as e:
            return [], [Reject(self.file, 0, f"cannot read file: {e}")]
        for lineno, row, error in rows:
            try:
                if row is None:
                    raise _Bad(error)
                new = self._items(row)
                ids = [it.item_id for it in new]
                dup = next((i for i in ids if i in seen), None)
                if dup is not None:
                    raise _Bad(f"duplicate id {dup!r}")
            except _Bad as e:
                rejects.append(Reject(self.file, lineno, str(e)))
                continue
            seen.update(ids)
            for it in new:
                it.meta.update(file=self.file, line=lineno)
            items.extend(new)
        return items, rejects

    def _items(
        self, row: dict[str, Any]
    ) -> list[EvalItem]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- field helpers -------------------------------------------------------------------
    @staticmethod
    def _field(row: dict[str, Any], key: str) -> Any:
        value = row.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _Bad(f"missing field {key!r}")
        return value

    def _image(self, row: dict[str, Any]) -> Path:
        """Resolved image path, checked once: it exists and PIL can open it."""
        rel = Path(str(self._field(row, "image")))
        path = rel if rel.is_absolute() else (self.image_root / rel).absolute()
        if path not in self._image_ok:
            self._image_ok[path] = _check_image(path)
        problem = self._image_ok[path]
        if problem:
            raise _Bad(problem)
        return path

    def _prompt(self, question: str) -> str:
        return (
            f"{question.strip()}\n{self.prompt_hint}"
            if self.prompt_hint
            else question.strip()
        )


def _check_image(path: Path) -> str | None:
    """``None`` if ``path`` is an image PIL can read, else the reason."""
    from PIL import Image

    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
        return f"unreadable image {path}: {type(e).__name__}"
    return None


@register
class POPE(_FileBenchmark):
    """POPE (object hallucination, yes/no): one JSONL file per split.

    Lines: ``{"question_id", "image", "text", "label"}``, label ``"yes"`` or ``"no"``.
    Metrics: see :func:`~vpa_lightning.eval.metrics.pope_metrics`.
    """

    name = "pope"

    def __init__(
        self,
        file: str,
        image_root: str | None = None,
        split: str | None = None,
        prompt_hint: str = SHORT_ANSWER_HINT,
    ) -> None:
        """
        Args:
            file: The split's JSONL file.
            image_root: Folder of relative image paths (default: the file's folder).
            split: ``random`` / ``popular`` / ``adversarial`` (or any tag); default: the split
                named in the file name, if any. Results are keyed ``pope_<split>``.
            prompt_hint: Answer-format instruction appended to each question.
        """
        super().__init__(file, image_root, prompt_hint)
        stem = Path(file).stem.lower()
        self.split = split or next((s for s in POPE_SPLITS if s in stem), None)

    @property
    def display_name(self) -> str:
        return f"pope_{self.split}" if self.split else "pope"

    def _items(self, row: dict[str, Any]) -> list[EvalItem]:
        qid = str(self._field(row, "question_id"))
        text = str(self._field(row, "text"))
        label = str(self._field(row, "label")).strip().lower()
        if label not in ("yes", "no"):
            raise _Bad(f"label must be yes or no, got {row['label']!r}")
        return [
            EvalItem(
                qid,
                self._image(row),
                self._prompt(text),
                {"label": label, "group": qid},
            )
        ]

    def parse(self, item: EvalItem, answer: str) -> str | None:
        return parse_yes_no(answer)

    def score(self, items: list[EvalItem], answers: list[str]) -> dict[str, float]:
        return pope_metrics(
            [parse_yes_no(a) for a in answers], [it.meta["label"] for it in items]
        )


@register
class MME(_FileBenchmark):
    """MME (perception + cognition, yes/no, two questions per image).

    Lines: ``{"question_id", "image", "question", "answer": "Yes"|"No", "category"}``. A trailing
    "Please answer yes or no." is replaced by ``prompt_hint`` (LLaVA's protocol).
    Metrics: see :func:`~vpa_lightning.eval.metrics.mme_metrics`.
    """

    name = "mme"

    def __init__(
        self,
        file: str,
        image_root: str | None = None,
        prompt_hint: str = SHORT_ANSWER_HINT,
    ) -> None:
        """
        Args:
            file: The JSONL file (all categories).
            image_root: Folder of relative image paths (default: the file's folder).
            prompt_hint: Answer-format instruction appended to each question.
        """
        super().__init__(file, image_root, prompt_hint)

    def _items(self, row: dict[str, Any]) -> list[EvalItem]:
        qid = str(self._field(row, "question_id"))
        question = str(self._field(row, "question")).strip()
        answer = str(self._field(row, "answer")).strip().lower()
        category = str(self._field(row, "category")).strip()
        if answer not in ("yes", "no"):
            raise _Bad(f"answer must be Yes or No, got {row['answer']!r}")
        image = self._image(row)
        suffix = "Please answer yes or no."
        if self.prompt_hint and question.endswith(suffix):
            question = question[: -len(suffix)].strip()
        meta = {
            "label": answer,
            "category": category,
            "image_key": str(image),
            "group": f"{category}|{image}",
        }
        return [EvalItem(qid, image, self._prompt(question), meta)]

    def parse(self, item: EvalItem, answer: str) -> str | None:
        return parse_yes_no(answer)

    def score(self, items: list[EvalItem], answers: list[str]) -> dict[str, float]:
        return mme_metrics(
            [parse_yes_no(a) for a in answers],
            [it.meta["label"] for it in items],
            [it.meta["category"] for it in items],
            [it.meta["image_key"] for it in items],
        )


_LETTERS = string.ascii_uppercase[
    :8
]  # MMBench uses A-D; a few more columns cost nothing


def _blank(value: Any) -> bool:
    # pandas-written TSVs spell missing cells "nan"
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or str(value).strip().lower() in ("", "nan", "none")
    )


@register
class MMBench(_FileBenchmark):
    """MMBench with circular evaluation: a question with N options becomes N rotations.

    Rows (JSONL, or TSV with a header when the file ends in ``.tsv``): ``index, question,
    hint (optional), A, B, C, D (empty = no such option), answer, category, image`` (a path).
    Rotation ``k`` shifts the options by ``k`` (option at letter ``i`` = original option
    ``(i + k) mod N``); item ids are ``"<index>#rot<k>"``.
    Metrics: see :func:`~vpa_lightning.eval.metrics.mmbench_metrics`.
    """

    name = "mmbench"

    def __init__(
        self,
        file: str,
        image_root: str | None = None,
        circular: bool = True,
        prompt_hint: str = CHOICE_HINT,
    ) -> None:
        """
        Args:
            file: JSONL or ``.tsv`` file.
            image_root: Folder of relative image paths (default: the file's folder).
            circular: Expand each question into all its rotations (``False``: original order only,
                so circular accuracy equals vanilla accuracy).
            prompt_hint: Answer-format instruction appended after the options.
        """
        super().__init__(file, image_root, prompt_hint)
        self.circular = circular

    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        if not self.file.lower().endswith(".tsv"):
            yield from super()._rows()
            return
        with open(self.file, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            start = 2  # header is line 1
            for row in reader:
                if None in row:  # more cells than header columns
                    yield start, None, "more cells than header columns"
                else:
                    yield start, dict(row), ""
                start = reader.line_num + 1

    def _items(self, row: dict[str, Any]) -> list[EvalItem]:
        index = str(self._field(row, "index"))
        question = str(self._field(row, "question")).strip()
        category = str(self._field(row, "category")).strip()
        answer = str(self._field(row, "answer")).strip().upper()
        options = [(k, str(row[k]).strip()) for k in _LETTERS if not _blank(row.get(k))]
        if len(options) < 2:
            raise _Bad("fewer than 2 options")
        letters = [k for k, _ in options]
        if letters != list(_LETTERS[: len(letters)]):
            raise _Bad(f"options must be consecutive letters from A, got {letters}")
        if answer not in letters:
            raise _Bad(f"answer {row['answer']!r} is not among the options {letters}")
        image = self._image(row)
        hint = "" if _blank(row.get("hint")) else str(row["hint"]).strip()
        texts = [t for _, t in options]
        n = len(texts)
        correct = letters.index(answer)
        items = []
        for k in range(n if self.circular else 1):
            rotated = {letters[i]: texts[(i + k) % n] for i in range(n)}
            body = "\n".join(f"{letter}. {text}" for letter, text in rotated.items())
            prompt = "\n".join(p for p in (hint, question, body) if p)
            meta = {
                "index": index,
                "rotation": k,
                "answer": letters[(correct - k) % n],
                "options": rotated,
                "category": category,
                "group": index,
            }
            items.append(EvalItem(f"{index}#rot{k}", image, self._prompt(prompt), meta))
        return items

    def parse(self, item: EvalItem, answer: str) -> str | None:
        return parse_choice(answer, item.meta["options"])

    def score(self, items: list[EvalItem], answers: list[str]) -> dict[str, float]:
        return mmbench_metrics(
            [parse_choice(a, it.meta["options"]) for it, a in zip(items, answers)],
            [it.meta["answer"] for it in items],
            [it.meta["index"] for it in items],
            [it.meta["rotation"] for it in items],
            [it.meta["category"] for it in items],
        )
