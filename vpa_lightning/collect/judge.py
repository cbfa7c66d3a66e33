"""``vpa judge``: rate every completion of a sampled (or published) file; the same file comes out with ratings.

Input: VLFeedback-layout rows (what ``vpa sample`` writes, or VLFeedback itself): ``prompt``, ``img_path``,
``completions: [{"model", "response"}]``. Each completion gets ``annotations: {aspect: {"Rating", "Rationale"}}``,
the form ``vpa-shard build`` reads (``--recipe silkie`` for the ``vlfeedback`` rubric, ``--recipe mmdpo`` for
``helpsteer``, ``--aspects Claims`` or ``--aspects Verified`` for the claims and rule judges).

Judges:

* ``openai``: a GPT-4V-class model behind any OpenAI-compatible server
  (:class:`~vpa_lightning.eval.judge.JudgeClient`: cache, retries, bounds), the images sent with each request, and
  a row's videos (``videos`` / ``video``, as ``vpa sample`` writes them) as ``vpa sample`` sends them: a video file
  as a ``video_url`` data URL (vLLM's format), a frame folder or frame list as its frames' ``image_url`` parts.
* ``hf``: a local VLM as labeler, scored by the probabilities of its next token over the rating values (the
  expected rating, renormalised over them; ``p_scale`` in the rationale is the mass those tokens had), never by
  parsing its free text, so a small model still gives a usable score; claims are its answer's sentences, each
  judged by p(yes) against p(no). A row's videos are decoded as ``vpa sample`` decodes them (``--video-fps``,
  ``--video-max-frames``, ``--video-max-pixels``) and go through the family's processor with the request, so the
  rating tokens are conditioned on the frames; a judge model whose family takes no video stops the run before
  anything is rated (:class:`~vpa_lightning.errors.VideoUnsupportedError`, naming the families that do).

A video prompt's images and videos sit where the prompt had them (at their places in the question inside the
request); an image-only prompt's images come first, as they always did. A row whose video (or, for ``hf``, image)
cannot be read is rejected with its file, line and reason, and the other rows are rated.
* ``rule``: verifiable rewards against a ground-truth field of the record (``--reference truth.answer``, a dotted
  path): ``exact`` (normalised text), ``contains`` (the reference as whole words; with ``--choices``, or each record's
  ``--choices-field``, no other choice may appear), ``yesno``, ``choice`` (the multiple-choice letter) and ``number`` (within ``--tolerance``).
  Aspect ``Verified``, 1 or 0.

A reply that gives no rating (unparseable, refused, off the scale) is kept in ``OUT.rejects.jsonl`` with the
record, the completion, the reason and the reply's start; that completion gets no annotations (``judge_error``
says why), so the build rejects it by name rather than score it. ``OUT.summary.json`` counts prompts,
completions, rated and rejected (``completions = rated + rejected``). Judged records go to ``OUT.parts`` as they
are done; a rerun with the same judge, rubric and input skips them (and the ``openai`` cache answers again whatever
was asked before).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vpa_lightning._io import write_text_atomic
from vpa_lightning.collect.prompts import _VIDEO_KEYS, Prompt, _record
from vpa_lightning.collect.rubrics import (
    CLAIMS_ASPECT,
    CLAIMS_CHECK,
    CLAIMS_SPLIT,
    Rubric,
    RubricError,
    load_rubric,
    parse_claims,
    parse_yes_no,
    quote,
    split_sentences,
)
from vpa_lightning.collect.sample import _progress, _read_part, chat_messages, settings_digest

__all__ = ["RULES", "rule_rating", "run_judge"]

RULES = ("exact", "contains", "yesno", "choice", "number")
RULE_ASPECT = "Verified"


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


def _lookup(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def rule_rating(rule: str, answer: str, reference: Any, choices: list[str] | None = None, tolerance: float = 0.0) -> float:
    """1.0 when ``answer`` is right against ``reference`` by ``rule`` (see the module doc), else 0.0."""
    if rule == "exact":
        return float(_normal(answer) == _normal(str(reference)))
    if rule == "contains":
        words = f" {_normal(answer)} "
        wanted = _normal(str(reference))
        if f" {wanted} " not in words and f" {wanted}s " not in words:
            return 0.0
        others = [c for c in (choices or []) if _normal(c) != wanted]
        return float(not any(f" {_normal(c)} " in words or f" {_normal(c)}s " in words for c in others))
    if rule == "yesno":
        try:
            said = parse_yes_no(answer)
        except RubricError:
            return 0.0
        truth = reference if isinstance(reference, bool) else _normal(str(reference)) in ("yes", "true", "1")
        return float(said == truth)
    if rule == "choice":
        letters = re.findall(r"\b([A-Z])\b", answer.strip()[:40]) or re.findall(r"^\(?([A-Za-z])[).:]", answer.strip())
        return float(bool(letters) and letters[0].upper() == str(reference).strip().strip("()").upper())
    if rule == "number":
        found = re.findall(r"[-+]?\d+(?:\.\d+)?", answer.replace(",", ""))
        if not found:
            return 0.0
        return float(abs(float(found[0]) - float(reference)) <= tolerance)
    raise ValueError(f"--rule must be one of {RULES}, got {rule!r}")


def _placed(prompt: Prompt, request: Callable[[str], str]) -> tuple[str, list[int] | None, list[int] | None]:
    """``(text, image offsets, video offsets)`` of a judge request ``request(question)`` about ``prompt``: a video
    prompt's images and videos where the prompt had them (their offsets in the question, moved to where the question
    sits in the request); otherwise ``None`` offsets, the media before the text (image prompts are asked exactly as
    before, so the ``openai`` cache still answers them)."""
    if not prompt.videos or (prompt.offsets is None and prompt.video_offsets is None):
        return request(prompt.question), None, None
    mark = f"\x00question-{secrets.token_hex(8)}\x00"  # never in an answer: it cannot move the media into one
    marked = request(mark)
    if marked.count(mark) != 1:  # a rubric without the question (or with it twice): the media first
        return request(prompt.question), None, None
    at = marked.index(mark)
    text = marked.replace(mark, prompt.question)
    return (text, [at + o for o in (prompt.offsets if prompt.offsets is not None else [0] * len(prompt.images))],
            [at + o for o in (prompt.video_offsets if prompt.video_offsets is not None else [0] * len(prompt.videos))])


class _OpenAIJudge:
    """A judge behind an OpenAI-compatible server: images as ``image_url`` parts, a video file as a ``video_url``
    data URL (vLLM's format), a frame folder or frame list as its frames' ``image_url`` parts (what ``vpa sample``
    sends: :func:`~vpa_lightning.collect.sample.chat_messages`)."""

    def __init__(self, rubric: Rubric | str, client: Any, video_sampling: Any = None) -> None:
        self.rubric, self.client, self.video_sampling = rubric, client, video_sampling

    def load(self, prompt: Prompt) -> None:
        """Decode the prompt's videos once, only to reject a row whose video cannot be read (as ``vpa sample``
        does) rather than send it; the server gets the files themselves."""
        prompt.load_videos(self.video_sampling)

    def _chat(self, system: str, prompt: Prompt, request: Callable[[str], str]) -> list[dict[str, Any]]:
        text, offsets, video_offsets = _placed(prompt, request)
        (turn,) = chat_messages(replace(prompt, question=text, offsets=offsets, video_offsets=video_offsets))
        chat = [{"role": "system", "content": system}] if system else []
        return chat + [turn]

    def rate(self, prompt: Prompt, answers: list[str], media: Any = None) -> list[dict[str, tuple[float, str]] | RubricError]:
        from vpa_lightning.collect.rubrics import _GUARD

        rubric = self.rubric
        if isinstance(rubric, Rubric):
            replies = self.client.judge_many([self._chat(rubric.system(), prompt, lambda q, a=a: rubric.request(q, a))
                                              for a in answers])
            out: list[Any] = []
            for reply in replies:
                try:
                    out.append(rubric.parse(reply))
                except RubricError as exc:
                    out.append(RubricError(f"{exc} (reply: {reply[:200]!r})"))
            return out
        # claims: split each answer, then ask about every claim
        splits = self.client.judge_many([self._chat(_GUARD, prompt, lambda q, a=a: CLAIMS_SPLIT.format(question=q, answer=quote(a)))
                                         for a in answers])
        claims: list[list[str] | RubricError] = []
        for reply in splits:
            try:
                claims.append(parse_claims(reply))
            except RubricError as exc:
                claims.append(exc)
        asks = [(i, c) for i, cs in enumerate(claims) if not isinstance(cs, RubricError) for c in cs]
        checks = self.client.judge_many([self._chat("", prompt, lambda q, c=c: CLAIMS_CHECK.format(claim=c)) for _, c in asks])
        verdicts: dict[int, list[bool]] = {}
        errors: dict[int, RubricError] = {}
        for (i, _), reply in zip(asks, checks):
            try:
                verdicts.setdefault(i, []).append(parse_yes_no(reply))
            except RubricError as exc:
                errors.setdefault(i, exc)
        out = []
        for i, cs in enumerate(claims):
            if isinstance(cs, RubricError):
                out.append(cs)
            elif i in errors:
                out.append(RubricError(f"claim check: {errors[i]}"))
            else:
                rejected = [c for c, ok in zip(cs, verdicts.get(i, [])) if not ok]
                out.append({CLAIMS_ASPECT: (-float(len(rejected)), json.dumps({"claims": cs, "rejected": rejected}))})
        return out


class _HFJudge:
    """A local VLM scored by its next-token probabilities over the rating values (or yes/no)."""

    def __init__(self, rubric: Rubric | str, model_spec: str, dtype: str | None, device: str | None,
                 video_sampling: Any = None) -> None:
        import torch

        from vpa_lightning.models.loading import load_vlm

        from vpa_lightning.models.families import family_of

        model, self.processor = load_vlm(model_spec, dtype=dtype)
        self.rubric, self.video_sampling = rubric, family_of(self.processor).video_sampling(video_sampling)
        self.model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        tok = self.processor.tokenizer
        if isinstance(rubric, Rubric):
            lo, hi = rubric.scale
            if lo != int(lo) or hi != int(hi) or hi - lo > 20:
                raise ValueError(f"--judge hf scores by the rating tokens: the scale must be a few integers, got {lo:g}-{hi:g}")
            self.values = list(range(int(lo), int(hi) + 1))
            self.tokens = [self._single(tok, str(v)) for v in self.values]
        else:
            self.yes = [t for t in (self._single(tok, w, strict=False) for w in ("yes", "Yes")) if t is not None]
            self.no = [t for t in (self._single(tok, w, strict=False) for w in ("no", "No")) if t is not None]
            if not self.yes or not self.no:
                raise ValueError("--judge hf with --rubric claims: the judge's tokenizer has no single token for yes/no")

    @staticmethod
    def _single(tok: Any, text: str, strict: bool = True) -> int | None:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            if strict:
                raise ValueError(f"--judge hf: the judge's tokenizer splits {text!r} into {len(ids)} tokens")
            return None
        return ids[0]

    def load(self, prompt: Prompt) -> tuple[list[Any], list[Any]]:
        """The prompt's images and videos (:class:`~vpa_lightning.models.video.VideoClip`, sampled as ``vpa sample``
        samples them); one that cannot be read raises ``ValueError`` naming it (the row is rejected)."""
        return prompt.load_images(), prompt.load_videos(self.video_sampling)

    def _next_token_probs(self, prompt: Prompt, requests: list[Callable[[str], str]], media: tuple[list[Any], list[Any]]) -> Any:
        """Next-token probabilities after each request, every row conditioned on the prompt's images and videos."""
        import torch

        from vpa_lightning.models.generation import (
            chat_prompt,
            encode_for_generation,
            shared_prefix_next_logits,
            to_model,
        )

        images, videos = media
        placed = [_placed(prompt, r) for r in requests]
        param = next(self.model.parameters())

        def encode(rows: list[tuple[str, Any, Any]]) -> dict[str, Any]:
            enc = encode_for_generation(
                self.processor, [images] * len(rows), [t for t, _, _ in rows], [o for _, o, _ in rows],
                # a batch without videos calls the family exactly as before videos existed
                **({"videos": [videos] * len(rows), "video_offsets": [v for _, _, v in rows],
                    "video_max_pixels": getattr(self.video_sampling, "max_pixels", None)} if videos else {}))
            return {k: to_model(v, k, param) for k, v in enc.items() if torch.is_tensor(v)}

        # the rows (answers x aspects) share the prompt's media and question: run those once, each row's own tokens
        # on top of their KV cache; the whole rows where they do not share them
        texts = [chat_prompt(self.processor, t, len(images), o, len(videos), v) for t, o, v in placed]
        logits = shared_prefix_next_logits(self.model, self.processor, texts, encode(placed[:1])) if len(placed) > 1 else None
        if logits is None:
            with torch.no_grad():
                logits = self.model(**encode(placed), logits_to_keep=1, use_cache=False, return_dict=True).logits[:, -1]
        return torch.softmax(logits.float(), dim=-1)

    def rate(self, prompt: Prompt, answers: list[str], media: tuple[list[Any], list[Any]] | None = None,
             ) -> list[dict[str, tuple[float, str]] | RubricError]:
        media = self.load(prompt) if media is None else media
        rubric = self.rubric
        if isinstance(rubric, Rubric):
            rows = [(a, aspect) for a in answers for aspect in rubric.aspects]
            probs = self._next_token_probs(prompt, [lambda q, a=a, s=s: rubric.aspect_request(q, a, s) for a, s in rows], media)
            picked = probs[:, self.tokens]
            mass = picked.sum(dim=1)
            expected = (picked * picked.new_tensor(self.values)).sum(dim=1) / mass.clamp_min(1e-30)
            out: list[Any] = []
            for i, _ in enumerate(answers):
                n = len(rubric.aspects)
                out.append({aspect: (round(float(expected[i * n + j]), 4), f"p_scale={float(mass[i * n + j]):.3f}")
                            for j, aspect in enumerate(rubric.aspects)})
            return out
        claims = [split_sentences(a) for a in answers]
        asks = [(i, c) for i, cs in enumerate(claims) for c in cs]
        out = []
        if asks:
            probs = self._next_token_probs(prompt, [lambda q, c=c: CLAIMS_CHECK.format(claim=c) for _, c in asks], media)
            yes, no = probs[:, self.yes].sum(dim=1), probs[:, self.no].sum(dim=1)
        for i, cs in enumerate(claims):
            rejected = [c for k, (j, c) in enumerate(asks) if j == i and float(no[k]) > float(yes[k])]
            out.append({CLAIMS_ASPECT: (-float(len(rejected)), json.dumps({"claims": cs, "rejected": rejected}))})
        return out


class _RuleJudge:
    def __init__(self, rule: str, reference: str, choices: list[str] | None, tolerance: float,
                 choices_field: str | None = None) -> None:
        if rule not in RULES:
            raise ValueError(f"--rule must be one of {RULES}, got {rule!r}")
        if choices and choices_field:
            raise ValueError("give --choices or --choices-field, not both")
        self.rule, self.reference, self.choices, self.tolerance = rule, reference, choices, tolerance
        self.choices_field = choices_field

    def rate(self, prompt: Prompt, answers: list[str], record: dict[str, Any]) -> list[Any]:
        try:
            reference = _lookup(record, self.reference)
        except KeyError:
            return [RubricError(f"the record has no reference field {self.reference!r}")] * len(answers)
        choices = self.choices
        if self.choices_field:
            try:
                choices = _lookup(record, self.choices_field)
            except KeyError:
                return [RubricError(f"the record has no choices field {self.choices_field!r}")] * len(answers)
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                return [RubricError(f"the choices field {self.choices_field!r} is not a list of strings")] * len(answers)
        return [{RULE_ASPECT: (rule_rating(self.rule, a, reference, choices, self.tolerance),
                               f"{self.rule} against {self.reference}")} for a in answers]


def run_judge(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    judge: str = "openai",
    rubric: str = "vlfeedback",
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    cache_dir: str | None = None,
    max_concurrency: int = 8,
    dtype: str | None = None,
    device: str | None = None,
    rule: str = "contains",
    reference: str | None = None,
    choices: list[str] | None = None,
    tolerance: float = 0.0,
    image_root: str | None = None,
    choices_field: str | None = None,
    video_sampling: Any = None,
) -> dict[str, Any]:
    """Rate every completion of ``source`` into ``out`` (see the module doc); returns the summary.
    ``video_sampling``: how the ``openai`` and ``hf`` judges decode a row's videos (a
    :class:`~vpa_lightning.data.video.VideoSampling`; ``None``: the trainer's defaults, 2 fps, at most 16 frames, as
    ``vpa sample``)."""
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise ValueError("--out must not be the input file (the input is never overwritten)")
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    has_videos = any(isinstance(r, dict) and any(r.get(k) not in (None, "", [], {}) for k in _VIDEO_KEYS) for r in rows)
    if has_videos and video_sampling is None and judge != "rule":
        from vpa_lightning.data.video import VideoSampling

        video_sampling = VideoSampling(max_image_pixels=89_478_485)
    if judge == "rule":
        if not reference:
            raise ValueError("--judge rule needs --reference FIELD (a dotted path to the ground truth in each record)")
        rater: Any = _RuleJudge(rule, reference, choices, tolerance, choices_field)
        aspects: tuple[str, ...] = (RULE_ASPECT,)
    else:
        spec = load_rubric(rubric)
        aspects = spec.aspects if isinstance(spec, Rubric) else (CLAIMS_ASPECT,)
        if judge == "openai":
            from vpa_lightning.eval.judge import JudgeClient

            client = JudgeClient(base_url=base_url, model=model, api_key=api_key, cache_dir=cache_dir,
                                 max_concurrency=max_concurrency)
            rater = _OpenAIJudge(spec, client, video_sampling)
        elif judge == "hf":
            if not model:
                raise ValueError("--judge hf needs --model (a local folder or tiny: spec)")
            rater = _HFJudge(spec, model, dtype, device, video_sampling)
            if has_videos:  # refused before anything is rated: a video prompt is never rated blind
                from vpa_lightning.models.families import family_of

                family_of(rater.processor).check_video(
                    rater.processor, f"--judge hf --model {model}: {source.name} has video prompts")
        else:
            raise ValueError(f"--judge must be openai, hf or rule, got {judge!r}")
    root = Path(image_root) if image_root is not None else source.parent
    # a part is reused only by the same judge, rubric and input (other settings judge afresh)
    settings = [judge, rubric if judge != "rule" else [rule, reference, choices, tolerance, *([choices_field] if choices_field else [])], model, base_url,
                str(source.resolve()), source.stat().st_size]
    if has_videos and judge != "rule":  # the frames shape the ratings; image-only runs keep their earlier digest
        settings.append(asdict(video_sampling))
    part = out.with_name(out.name + ".parts") / f"judged-{settings_digest(settings)}.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    done = _read_part(part)
    bar = _progress(len(rows) - len(done), f"judge {judge}")
    t0 = time.perf_counter()
    with open(part, "a", encoding="utf-8") as f:
        for n, row in enumerate(rows, start=1):
            rid = str(row.get("id", f"{source.stem}:{n}")) if isinstance(row, dict) else f"{source.stem}:{n}"
            if rid in done:
                continue
            result: dict[str, Any] = {"id": rid, "ratings": [], "errors": {}}
            completions = row.get("completions") if isinstance(row, dict) else None
            if not isinstance(completions, list) or not completions:
                result["record_error"] = "no completions"
            else:
                answers = [c.get("response") if isinstance(c, dict) else None for c in completions]
                try:
                    prompt = _record(row, f"{source}:{n}", root, rid)
                    # a video (or, for hf, an image) that cannot be read rejects its row: never rated unseen
                    media = rater.load(prompt) if judge != "rule" else None
                except ValueError as exc:
                    result["record_error"] = str(exc)
                else:
                    usable = [i for i, a in enumerate(answers) if isinstance(a, str) and a.strip()]
                    rated = (rater.rate(prompt, [answers[i] for i in usable], row) if judge == "rule"
                             else rater.rate(prompt, [answers[i] for i in usable], media))
                    ratings: list[Any] = [None] * len(answers)
                    for i, r in zip(usable, rated):
                        ratings[i] = r
                    for i, r in enumerate(ratings):
                        if r is None:
                            result["errors"][str(i)] = "empty response"
                        elif isinstance(r, RubricError):
                            result["errors"][str(i)] = str(r)
                    result["ratings"] = [None if r is None or isinstance(r, RubricError) else
                                         {a: {"Rating": v, "Rationale": why} for a, (v, why) in r.items()} for r in ratings]
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
            f.flush()
            done[rid] = result
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    # the judged file: every input record, each completion with its annotations (or its judge_error)
    lines, rejects = [], []
    counts = {"prompts": len(rows), "completions": 0, "rated": 0, "rejected": 0, "records_rejected": 0}
    for n, row in enumerate(rows, start=1):
        rid = str(row.get("id", f"{source.stem}:{n}")) if isinstance(row, dict) else f"{source.stem}:{n}"
        result = done[rid]
        if "record_error" in result:
            counts["records_rejected"] += 1
            rejects.append({"source": f"{source}:{n}", "id": rid, "reason": result["record_error"]})
            lines.append(json.dumps(row, ensure_ascii=False))
            continue
        row = dict(row)
        row["completions"] = [dict(c) for c in row["completions"]]
        for i, c in enumerate(row["completions"]):
            counts["completions"] += 1
            rating = result["ratings"][i] if i < len(result["ratings"]) else None
            if rating is None:
                counts["rejected"] += 1
                reason = result["errors"].get(str(i), "not rated")
                c["judge_error"] = reason
                c.pop("annotations", None)
                rejects.append({"source": f"{source}:{n}", "id": rid, "completion": i, "model": c.get("model"), "reason": reason})
            else:
                counts["rated"] += 1
                c["annotations"] = rating
        lines.append(json.dumps(row, ensure_ascii=False))
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    write_text_atomic(out.with_name(out.name + ".rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects))
    summary = {"out": str(out), "judge": judge, "rubric": None if judge == "rule" else rubric, "aspects": list(aspects),
               **counts, "seconds": time.perf_counter() - t0}
    if judge == "openai":
        summary["requests"] = rater.client.counters
        rater.client.close()
    write_text_atomic(out.with_name(out.name + ".summary.json"), json.dumps(summary, indent=2) + "\n")
    if counts["rated"] == 0:
        raise RuntimeError(f"no completion was rated ({counts['rejected']} rejected; see {out.name}.rejects.jsonl)")
    return summary
