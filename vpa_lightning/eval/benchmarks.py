"""Rule-scored benchmarks: POPE, MME, MMBench (circular) and MVBench (video), read from local files.

Every class takes the benchmark file, an optional ``image_root`` (relative image paths are
resolved against it; default: the benchmark file's folder) and an answer-format hint appended to
the question. :meth:`~vpa_lightning.eval.base.Benchmark.load` never raises on content: each bad
line (malformed JSON, missing field, bad label, answer not among the options, missing or
unreadable image, duplicate id) becomes a :class:`~vpa_lightning.eval.base.Reject` with its
1-based line number. Items carry ``meta["group"]`` (what must stay together when a run is
limited: an MME image's two questions, an MMBench question's rotations) and
``meta["file"]`` / ``meta["line"]``.

:data:`BENCHMARKS` maps the YAML name (``pope``, ``mme``, ``mmbench``, ``mvbench``) to the class; other
modules add theirs with :func:`register`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from vpa_lightning.eval.base import Benchmark, EvalItem, Reject
from vpa_lightning.eval.metrics import (
    mmbench_metrics,
    mme_metrics,
    mvbench_metrics,
    pope_metrics,
)
from vpa_lightning.eval.parsing import parse_choice, parse_yes_no

__all__ = [
    "BENCHMARKS",
    "MME",
    "MVBENCH_TASKS",
    "POPE",
    "MMBench",
    "MVBench",
    "build_benchmark",
    "register",
]

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


#: MVBench's 20 tasks as published (huggingface.co/datasets/OpenGVLab/MVBench; the task table of Ask-Anything's
#: ``video_chat2/mvbench.ipynb``): task (its ``json/<task>.json``) -> (folder of its videos under ``video/``, data
#: type, whether its entries have a ``start``/``end`` bound in seconds). ``frame``: each ``video`` is a folder of
#: 1-based ``00001.jpg`` ... frames extracted at 3 fps.
MVBENCH_TASKS: dict[str, tuple[str, str, bool]] = {
    "action_sequence": ("star/Charades_v1_480", "video", True),
    "action_prediction": ("star/Charades_v1_480", "video", True),
    "action_antonym": ("ssv2_video", "video", False),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", "video", False),
    "unexpected_action": ("FunQA_test/test", "video", False),
    "object_existence": ("clevrer/video_validation", "video", False),
    "object_interaction": ("star/Charades_v1_480", "video", True),
    "object_shuffle": ("perception/videos", "video", False),
    "moving_direction": ("clevrer/video_validation", "video", False),
    "action_localization": ("sta/sta_video", "video", True),
    "scene_transition": ("scene_qa/video", "video", False),
    "action_count": ("perception/videos", "video", False),
    "moving_count": ("clevrer/video_validation", "video", False),
    "moving_attribute": ("clevrer/video_validation", "video", False),
    "state_change": ("perception/videos", "video", False),
    "fine_grained_pose": ("nturgbd", "video", False),
    "character_order": ("perception/videos", "video", False),
    "egocentric_navigation": ("vlnqa", "video", False),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", "frame", True),
    "counterfactual_inference": ("clevrer/video_validation", "video", False),
}

_WS = re.compile(r"\s*")


def _json_list(text: str) -> Iterator[tuple[int, int, Any, str]]:
    """``(line, entry, value, error)`` per entry of a JSON list, ``line`` where the entry starts (1-based),
    ``entry`` its 1-based position. A syntax error ends the list: one row with the error at its line (the
    entries before it are kept; nothing after a broken entry can be told apart reliably)."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _WS.match(text, 0).end()
    if not text.startswith("[", pos):
        yield line_at(pos), 0, None, "not a JSON list of entries"
        return
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    entry = 0
    while True:
        entry += 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line_at(e.pos), entry, None, f"malformed JSON: {e.msg} (entry {entry}; the rest of the file is not read)"
            return
        yield line_at(pos), entry, value, ""
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            yield line_at(pos), entry + 1, None, "malformed JSON: expected ',' or ']' (the rest of the file is not read)"
            return


def _scalar_text(value: Any, what: str) -> str:
    # MVBench's candidates are strings; numbers are taken as written, anything else is a malformed entry
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise _Bad(f"{what} must be a non-empty string, got {value!r}")
    return str(value).strip()


def _seconds(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{'missing field' if value is None else 'bad'} {key!r} (seconds): {value!r}")
    return float(value)


@register
class MVBench(Benchmark):
    """MVBench (Li et al., "MVBench: A Comprehensive Multi-modal Video Understanding Benchmark", CVPR 2024):
    20 temporal tasks of multiple-choice questions about short videos, in its published layout::

        <root>/json/<task>.json            [{"video", "question", "candidates", "answer"[, "start", "end"]}, ...]
        <root>/video/<task folder>/<video> a video file (mp4, webm, avi, gif ...) or a frame folder

    with the task folders of :data:`MVBENCH_TASKS`. ``answer`` is the text of the correct candidate. The
    question is asked as ``Question: ...`` / ``Options:`` / ``(A) ...`` lines (MVBench's own template) plus
    ``prompt_hint``; the letter is read from the answer by
    :func:`~vpa_lightning.eval.parsing.parse_choice`. Tasks with a bound (action_sequence, action_prediction,
    object_interaction, action_localization, episodic_reasoning) use only their ``start``..``end`` seconds of
    the video, sampled at the run's ``video_fps`` / ``video_max_frames`` like a whole video elsewhere; other
    tasks' ``start``/``end`` are ignored, as MVBench's script does. Frame folders (episodic_reasoning) count as
    taken at ``frame_fps``.

    Rejected with the line where the entry starts and its entry number: malformed JSON, an entry that is not
    an object, a missing field, fewer than 2 or repeated candidates, an answer not among them, a missing or
    bad bound, a missing video or an empty frame folder (a video that fails to decode is rejected by the
    runner when its batch comes). A task's missing JSON file is one reject (line 0).
    Items alternate between tasks (the first of every task, then the second ...), so ``--limit N`` samples
    every task. Metrics: see :func:`~vpa_lightning.eval.metrics.mvbench_metrics`.
    """

    name = "mvbench"

    def __init__(
        self,
        root: str,
        tasks: list[str] | None = None,
        json_dir: str = "json",
        video_dir: str = "video",
        frame_fps: float = 3.0,
        prompt_hint: str = CHOICE_HINT,
    ) -> None:
        """
        Args:
            root: The MVBench folder (as downloaded: ``json/`` and ``video/`` in it).
            tasks: Tasks to evaluate (keys of :data:`MVBENCH_TASKS`, e.g. ``action_sequence``); ``None``: all 20.
            json_dir: Folder of the task files, relative to ``root`` (or absolute).
            video_dir: Folder of the task video folders, relative to ``root`` (or absolute).
            frame_fps: Frames per second of the frame-folder tasks' frames (MVBench's TVQA frames: 3).
            prompt_hint: Answer-format instruction appended after the options.
        """
        unknown = sorted(set(tasks or ()) - set(MVBENCH_TASKS))
        if unknown:
            raise ValueError(f"unknown MVBench task(s) {unknown}; known: {sorted(MVBENCH_TASKS)}")
        if tasks is not None and not tasks:
            raise ValueError("tasks: give at least one task, or null for all")
        if not frame_fps > 0:
            raise ValueError(f"frame_fps must be > 0, got {frame_fps}")
        self.root = Path(root)
        self.file = str(self.root)  # the runner names rejects without an item by it
        self.tasks = list(dict.fromkeys(tasks)) if tasks is not None else list(MVBENCH_TASKS)
        self.json_dir = self.root / json_dir
        self.video_dir = self.root / video_dir
        self.frame_fps = float(frame_fps)
        self.prompt_hint = prompt_hint

    @property
    def display_name(self) -> str:
        return self.name

    def load(self) -> tuple[list[EvalItem], list[Reject]]:
        per_task: list[list[EvalItem]] = []
        rejects: list[Reject] = []
        for task in self.tasks:
            file = self.json_dir / f"{task}.json"
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                rejects.append(Reject(str(file), 0, f"cannot read file: {e}"))
                continue
            items = []
            for line, entry, row, error in _json_list(text):
                try:
                    if error:
                        raise _Bad(error)
                    if not isinstance(row, dict):
                        raise _Bad(f"entry {entry} is not a JSON object")
                    item = self._item(task, entry, row)
                except _Bad as e:
                    reason = str(e) if error else f"entry {entry}: {e}"
                    rejects.append(Reject(str(file), line, reason))
                    continue
                item.meta.update(file=str(file), line=line)
                items.append(item)
            per_task.append(items)
        # round robin over the tasks: a limited run still covers every task
        ordered = [it for rank in range(max(map(len, per_task), default=0))
                   for items in per_task if rank < len(items) for it in (items[rank],)]
        return ordered, rejects

    def _item(self, task: str, entry: int, row: dict[str, Any]) -> EvalItem:
        folder, data_type, bounded = MVBENCH_TASKS[task]
        video = str(_FileBenchmark._field(row, "video"))
        question = str(_FileBenchmark._field(row, "question")).strip()
        candidates = row.get("candidates")
        if not isinstance(candidates, list) or len(candidates) < 2:
            raise _Bad(f"'candidates' must be a list of at least 2 options, got {candidates!r}")
        if len(candidates) > len(string.ascii_uppercase):
            raise _Bad(f"{len(candidates)} candidates: more than there are letters")
        texts = [_scalar_text(c, "each candidate") for c in candidates]
        if len(set(texts)) < len(texts):
            raise _Bad(f"candidates repeat: {texts}")
        answer = _scalar_text(_FileBenchmark._field(row, "answer"), "'answer'")
        if answer not in texts:
            raise _Bad(f"answer {answer!r} is not among the candidates {texts}")
        bound = (_seconds(row, "start"), _seconds(row, "end")) if bounded else None
        if bound is not None and bound[1] < bound[0]:
            raise _Bad(f"bound ends ({bound[1]} s) before it starts ({bound[0]} s)")
        path = Path(video)
        path = path if path.is_absolute() else (self.video_dir / folder / path).absolute()
        frames = data_type == "frame" or path.is_dir()
        if frames:
            from vpa_lightning.data.video import folder_frames

            if not path.is_dir():
                raise _Bad(f"frame folder not found: {path}")
            if not folder_frames(path):
                raise _Bad(f"frame folder holds no frame images: {path}")
        elif not path.is_file():
            raise _Bad(f"video not found: {path}")
        from vpa_lightning.eval.video import EvalVideo

        letters = string.ascii_uppercase[: len(texts)]
        options = dict(zip(letters, texts))
        body = "\n".join(f"({k}) {t}" for k, t in options.items())
        prompt = f"Question: {question}\nOptions:\n{body}"
        if self.prompt_hint:
            prompt += f"\n{self.prompt_hint}"
        item_id = f"{task}/{entry}"
        meta = {"task": task, "answer": letters[texts.index(answer)], "options": options, "group": item_id}
        clip = EvalVideo(path, bound, self.frame_fps if frames else None)
        return EvalItem(item_id, None, prompt, meta, video=clip)

    def parse(self, item: EvalItem, answer: str) -> str | None:
        return parse_choice(answer, item.meta["options"])

    def score(self, items: list[EvalItem], answers: list[str]) -> dict[str, float]:
        return mvbench_metrics(
            [parse_choice(a, it.meta["options"]) for it, a in zip(items, answers)],
            [it.meta["answer"] for it in items],
            [it.meta["task"] for it in items],
        )
