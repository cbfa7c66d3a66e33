"""``vpa rounds``: on-policy preference rounds in one command (see :mod:`vpa_lightning.loop.rounds`).

::

    vpa rounds --config configs/rlaifv_rounds_llava15_7b.yaml
    vpa rounds --model tiny:llava --prompts prompts.jsonl --fit_config fit.yaml --out_dir runs/rounds \\
        --judge rule --reference_field truth.answer --num_rounds 2
    vpa rounds --help          # every option, documented from the docstring below
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Literal

__all__ = ["main", "rounds"]


def rounds(
    model: str,
    prompts: list[str],
    out_dir: str,
    fit_config: str,
    num_rounds: int = 2,
    source: Literal["sample", "seva"] = "sample",
    k: int = 4,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 64,
    prompts_per_round: int | None = None,
    pool: list[dict[str, Any]] | None = None,
    policy_in_pool: bool = True,
    judge: Literal["rule", "hf", "openai"] = "rule",
    rubric: str = "vlfeedback",
    judge_model: str | None = None,
    judge_base_url: str | None = None,
    rule: str = "contains",
    reference_field: str | None = None,
    choices: list[str] | None = None,
    choices_field: str | None = None,
    tolerance: float = 0.0,
    strategy: str = "all-pairs",
    aspects: str | None = None,
    val_fraction: float = 0.1,
    reference: Literal["round", "initial"] = "round",
    heldout_prompts: list[str] | None = None,
    benchmarks: list[dict[str, Any]] | None = None,
    fit_args: list[str] | None = None,
    backend: Literal["hf", "openai"] = "hf",
    base_url: str | None = None,
    served_name: str | None = None,
    serve_command: str | None = None,
    serve_timeout: float = 900.0,
    dtype: str | None = None,
    image_root: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    augmentation: Any = "diffusion_noise",
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """On-policy rounds: the policy answers, a judge rates, the build ranks, a fit trains, the result is evaluated.

    Args:
        model: Round-0 policy: a local transformers folder or a ``tiny:`` model.
        prompts: Prompt files (JSON lines, JSON, Parquet) or ``vpa-shard build`` folders (``source: seva``: one
            SeVa prompts file, or one per round).
        out_dir: Gets ``round0/``, ``round1/``, ... (sample, judge, shards, train, model, eval, ``round.json``),
            ``initial-eval/``, ``rounds.json``, ``rounds.md`` and ``rounds.png``; a rerun resumes.
        fit_config: The ``vpa fit`` YAML; per round its model, ``data.train_shards``, ``trainer.default_root_dir``,
            ``model.reference_cache_dir`` and ``seed_everything`` are set (LoRA or full fine-tuning: each round
            exports ``model/merged``, the next round's policy, and under LoRA ``model/adapter``).
        num_rounds: Rounds to run.
        source: ``sample`` (the policy's K answers, rated by ``judge``) or ``seva`` (SeVa's pairs: answers on the
            original image against answers on an augmented one).
        k: Answers per prompt and round.
        temperature: Sampling temperature of the policy.
        top_p: Nucleus mass of the policy's sampling.
        max_new_tokens: Longest answer (also for the held-out answers).
        prompts_per_round: Prompts per round, a fresh seeded slice of ``prompts`` each round; ``null``: all of them.
        pool: More models that answer every prompt each round, as ``vpa sample``'s ``--pool`` entries (``name``,
            ``model``, ``backend``, ``base_url``, ``k``, ``temperature``, ...): Silkie's distillation from a pool of
            VLMs, or the policy against stronger models.
        policy_in_pool: Whether the policy samples too (``false``: only ``pool`` answers, off-policy distillation).
        judge: ``rule`` (verifiable, against ``reference_field``), ``hf`` (a local labeler, ``judge_model``) or
            ``openai`` (``judge_model`` at ``judge_base_url``; the key from ``$VPA_JUDGE_API_KEY``).
        rubric: ``vlfeedback``, ``helpsteer``, ``claims`` (RLAIF-V) or a rubric file (``hf`` and ``openai`` judges).
        judge_model: The judge's model (``hf``: a folder or ``tiny:`` spec; ``openai``: the served name).
        judge_base_url: ``openai`` judge: the server's ``/v1`` root.
        rule: ``rule`` judge: exact, contains, yesno, choice or number.
        reference_field: ``rule`` judge: the dotted path of each prompt's ground truth (e.g. ``truth.answer``).
        choices: ``rule`` judge, ``contains``: values of which an answer may name only the right one.
        choices_field: ``rule`` judge, ``contains``: the dotted path of each prompt's own ``choices`` list instead.
        tolerance: ``rule`` judge, ``number``: largest accepted difference.
        strategy: The build's pair selection (``all-pairs``, ``best-vs-rest``, ``best-vs-worst``,
            ``min-probability`` for Bradley-Terry, ...); a group keeps all its answers for listwise losses.
        aspects: The build's aspects (``null``: every aspect the judge rates).
        val_fraction: Share of each round's groups held out in ``val`` shards (the fit's validation).
        reference: ``round`` (the round's starting policy, as RLAIF-V) or ``initial`` (the original model).
        heldout_prompts: Prompts answered greedily by every round's policy and by the initial model, rated by the
            same judge: the ``heldout_reward`` column.
        benchmarks: ``vpa eval`` benchmarks run on every round's policy (as ``vpa eval``'s ``benchmarks``).
        fit_args: Extra ``vpa fit`` arguments for every round, e.g. ``["--trainer.max_epochs=1"]``.
        backend: How the policy samples: ``hf`` (its folder, here) or ``openai`` (a server that loads each round's
            ``model/merged`` or ``model/adapter``, at ``base_url``).
        base_url: ``openai`` backend: the server's ``/v1`` root.
        served_name: ``openai`` backend: the name the server gives the policy (default: the round's policy folder,
            the name ``vllm serve FOLDER`` gives it).
        serve_command: ``openai`` backend: a command that serves the round's policy at ``base_url``, ``{model}``
            replaced by its folder (e.g. ``vllm serve {model} --port 8000``); started before each round samples and
            stopped after, so the GPU is free for the fit (see :mod:`vpa_lightning.loop.server`). Without it the
            user's server must load each round's ``model/merged`` itself.
        serve_timeout: Seconds ``serve_command`` may take to answer.
        dtype: Weight dtype for sampling (``bfloat16`` on GPUs).
        image_root: Relative image paths are relative to this (default: each prompt file's folder).
        cache_dir: The request cache of the ``openai`` backends.
        seed: Base seed; round ``r`` uses ``seed + r``.
        augmentation: ``source: seva``: the rejected side's corruption.
        batch_size: ``source: seva``: prompts per ``generate`` call.

    Returns:
        One summary per round (also ``OUT/round{r}/round.json``).
    """
    from vpa_lightning.loop.rounds import heldout_reward, run_rounds, sample_judge_build

    if source == "seva":
        from vpa_lightning.seva.rounds import seva_data_stage

        if not prompts:
            raise ValueError("--prompts: no prompts file")
        if len(prompts) not in (1, num_rounds):
            raise ValueError(f"--prompts: give one file or one per round ({num_rounds}), got {len(prompts)}")
        data_stage = partial(seva_data_stage, prompts_files=prompts, image_root=image_root or str(Path(prompts[0]).parent),
                             augmentation=augmentation, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             val_fraction=val_fraction, dtype=dtype)
        evaluate = None
    else:
        if judge == "rule" and not reference_field:
            raise ValueError("--judge rule needs --reference_field (the dotted path of each prompt's ground truth)")
        judge_options = ({"judge": "rule", "rule": rule, "reference": reference_field, "choices": choices,
                          "choices_field": choices_field, "tolerance": tolerance} if judge == "rule" else
                         {"judge": judge, "rubric": rubric, "model": judge_model, "base_url": judge_base_url})
        data_stage = partial(sample_judge_build, prompts=list(prompts), judge=judge_options, aspects=aspects, k=k,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, strategy=strategy,
                             val_fraction=val_fraction, prompts_per_round=prompts_per_round, pool=pool,
                             policy_in_pool=policy_in_pool, backend=backend, base_url=base_url,
                             served_name=served_name, serve_command=serve_command, serve_timeout=serve_timeout,
                             dtype=dtype, image_root=image_root, cache_dir=cache_dir)
        evaluate = (partial(_heldout, heldout_reward, prompts=list(heldout_prompts), judge=judge_options,
                            max_new_tokens=max_new_tokens, dtype=dtype, image_root=image_root, cache_dir=cache_dir)
                    if heldout_prompts else None)
    return run_rounds(model=model, out_dir=out_dir, fit_config=fit_config, num_rounds=num_rounds, data_stage=data_stage,
                      fit_args=fit_args, seed=seed, reference=reference, evaluate=evaluate, benchmarks=benchmarks)


def _heldout(fn: Any, model: str, out: Path, **kwargs: Any) -> dict[str, Any]:
    return fn(model, out, **kwargs)


def main(argv: list[str] | None = None) -> Any:
    """``vpa rounds [--config FILE] [options]``."""
    from jsonargparse import auto_cli

    from vpa_lightning.errors import UsageError, VpaError

    try:
        result = auto_cli(rounds, args=argv, as_positional=False)
    except (ValueError, FileNotFoundError) as exc:  # a bad option or input: named, exit status 2
        raise UsageError(str(exc)) from exc
    except RuntimeError as exc:  # a round that cannot go on (no pairs, a fit that wrote nothing): exit status 1
        raise VpaError(str(exc)) from exc
    rows = [{k: s.get(k) for k in ("round", "prompts", "mean_reward", "pairs", "all_tie_dropped")}
            | {"heldout_reward": s.get("eval", {}).get("heldout_reward")} for s in result]
    print(json.dumps(rows, indent=2, default=str))
    return result
