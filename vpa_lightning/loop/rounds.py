"""On-policy rounds: the current policy answers, a judge rates, the build ranks, one fit trains, the result is
evaluated, and the next round starts from it (``vpa rounds``; SeVa's rounds are the same loop with SeVa's pairs as
the data, ``vpa seva rounds``).

Per round ``r``, everything lives in ``OUT/round{r}/``, stage by stage:

1. **data**: ``sample/`` K answers per prompt from the policy (:func:`~vpa_lightning.collect.sample.run_sample`;
   ``hf`` with the policy's folder, or ``openai`` for a policy a server runs), ``judge/`` their ratings
   (:func:`~vpa_lightning.collect.judge.run_judge`: rule, a local labeler or an OpenAI-compatible judge, any rubric),
   ``shards/`` the build (Bradley-Terry over the rated aspects; a group is kept whole with every answer, for listwise
   losses, and its pairs for DPO; a prompt whose answers all tie gives no pair and is counted, not trained on);
   or, for ``source="seva"``, SeVa's pairs (:func:`~vpa_lightning.seva.generate.generate_pairs`).
2. **train**: ``vpa fit`` with the fit config, from the policy, into ``train/``; the reference is the round's
   starting policy (as RLAIF-V) or, with ``reference="initial"``, the original model
   (``--model.reference_model_name_or_path``); a fresh reference cache per round (``reference-cache/``). A fit
   killed midway resumes from its last checkpoint (exact resume).
3. **export**: ``model/adapter`` (under LoRA) and ``model/merged``, the next round's policy.
4. **eval**: the policy's greedy answers to the held-out prompts, rated by the same judge (``heldout_reward``), and
   any ``vpa eval`` benchmarks, into ``eval/``. The initial model is evaluated the same way once
   (``OUT/initial-eval/``), so the table starts from it.

Each stage writes its result to ``stages.json`` when it is done and ``round.json`` is written last, so a rerun
resumes at the first unfinished stage of the first unfinished round (sampling and judging resume inside the stage;
a half-built stage folder of the build, export or evaluation is made again). ``OUT/rounds.json`` holds every
finished round's row, ``OUT/rounds.md`` the table and ``OUT/rounds.png`` the held-out curve.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpa_lightning._io import write_text_atomic
from vpa_lightning.loop.server import served

__all__ = ["RoundContext", "heldout_reward", "run_rounds", "sample_judge_build"]


@dataclass
class RoundContext:
    """What a round's data stage gets: its number, folder, the policy it starts from and its seed."""

    round: int
    dir: Path
    policy: str
    seed: int


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _newest_checkpoint(folder: Path) -> str | None:
    found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return str(found[-1]) if found else None


def _scalars(metrics: Any) -> dict[str, float]:
    out = {}
    for k, v in dict(metrics).items():
        try:
            if getattr(v, "numel", lambda: 1)() == 1:
                out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def sample_judge_build(
    ctx: RoundContext,
    *,
    prompts: list[str],
    judge: dict[str, Any],
    aspects: str | None,
    k: int = 4,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 64,
    strategy: str = "all-pairs",
    val_fraction: float = 0.1,
    prompts_per_round: int | None = None,
    pool: list[dict[str, Any]] | None = None,
    policy_in_pool: bool = True,
    backend: str = "hf",
    base_url: str | None = None,
    served_name: str | None = None,
    serve_command: str | None = None,
    serve_timeout: float = 900.0,
    dtype: str | None = None,
    image_root: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """The ``sample`` source's data stage: the policy (and any ``pool`` models) samples, the judge rates, the build
    ranks."""
    from vpa_lightning.collect.judge import run_judge
    from vpa_lightning.collect.sample import PoolModel, SampleSettings, pool_models, run_sample
    from vpa_lightning.data import build
    from vpa_lightning.data.shards import EmptyBuildError

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    settings = SampleSettings(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=ctx.seed)
    # a served policy is asked for by its served name (default: its folder, vLLM's default name for it)
    models = [PoolModel(name="policy", model=served_name if backend == "openai" and served_name else ctx.policy,
                        backend=backend, base_url=base_url, dtype=dtype, settings=settings)] if policy_in_pool else []
    models += pool_models(pool or [], vars(settings).copy(), "--pool", dtype=dtype)
    if not models:
        raise ValueError("--policy_in_pool false needs --pool models to sample from")
    select = (ctx.seed - ctx.round, ctx.round * prompts_per_round, prompts_per_round) if prompts_per_round else None
    serving: Any = contextlib.nullcontext()
    if serve_command and policy_in_pool:
        if backend != "openai" or not base_url:
            raise ValueError("--serve_command needs --backend openai and --base_url (where the command serves)")
        serving = served(serve_command, base_url, ctx.policy, ctx.dir / "sample" / "serve.log", timeout=serve_timeout)
    with serving:
        sampled = run_sample(prompts, models, ctx.dir / "sample" / "sampled.jsonl", image_root=image_root,
                             cache_dir=cache_dir, select=select)
    times["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the sampled file names its images relative to itself
    judged = run_judge(ctx.dir / "sample" / "sampled.jsonl", ctx.dir / "judge" / "judged.jsonl", cache_dir=cache_dir, **judge)
    times["judge"] = time.perf_counter() - t0
    rows = [json.loads(line) for line in (ctx.dir / "judge" / "judged.jsonl").read_text().splitlines()]
    ratings = [sum(a["Rating"] for a in c["annotations"].values()) / len(c["annotations"])
               for row in rows for c in row.get("completions", []) if c.get("annotations")]
    t0 = time.perf_counter()
    shards = ctx.dir / "shards"
    if shards.exists():  # a build cut short: ours, made again
        shutil.rmtree(shards)
    try:
        manifest = build([str(ctx.dir / "judge" / "judged.jsonl")], str(shards), strategy=strategy,
                         aspects=aspects or ",".join(judged["aspects"]), val_fraction=val_fraction, seed=ctx.seed)
    except EmptyBuildError as exc:
        raise RuntimeError(f"round {ctx.round}: no pairs to train on: every prompt's answers tied or were rejected "
                           f"({judged['rated']} of {judged['completions']} answers rated; see {shards}/rejects.jsonl)") from exc
    times["build"] = time.perf_counter() - t0
    counts = manifest["counts"]
    if not counts.get("pairs_train"):
        raise RuntimeError(f"round {ctx.round}: no training pairs ({counts.get('pairs', 0)} pairs, all held out); "
                           "lower val_fraction or sample more prompts")
    return {"shards": str(shards), "prompts": sampled["sampled"], "completions": judged["completions"],
            "rated": judged["rated"], "judge_rejected": judged["rejected"],
            "mean_reward": sum(ratings) / len(ratings) if ratings else None,
            "groups": counts.get("groups"), "pairs": counts.get("pairs"), "pairs_train": counts.get("pairs_train"),
            "all_tie_dropped": counts.get("records_rejected", 0), "seconds_by_step": times}


def heldout_reward(model: str, out: Path, *, prompts: list[str], judge: dict[str, Any], max_new_tokens: int = 64,
                   dtype: str | None = None, image_root: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The mean rating, by ``judge``, of ``model``'s greedy answers to the held-out ``prompts``."""
    from vpa_lightning.collect.judge import run_judge
    from vpa_lightning.collect.sample import PoolModel, SampleSettings, run_sample

    pool = [PoolModel(name="policy", model=model, dtype=dtype,
                      settings=SampleSettings(k=1, temperature=0.0, max_new_tokens=max_new_tokens))]
    run_sample(prompts, pool, out / "answers.jsonl", image_root=image_root, cache_dir=cache_dir)
    summary = run_judge(out / "answers.jsonl", out / "judged.jsonl", cache_dir=cache_dir, **judge)
    ratings = [sum(a["Rating"] for a in c["annotations"].values()) / len(c["annotations"])
               for line in (out / "judged.jsonl").read_text().splitlines()
               for c in json.loads(line).get("completions", []) if c.get("annotations")]
    return {"heldout_reward": sum(ratings) / len(ratings) if ratings else None, "heldout_prompts": summary["prompts"],
            "heldout_rated": summary["rated"]}


def run_rounds(
    *,
    model: str,
    out_dir: str | os.PathLike[str],
    fit_config: str,
    num_rounds: int,
    data_stage: Callable[[RoundContext], dict[str, Any]],
    fit_args: list[str] | None = None,
    seed: int = 0,
    reference: str = "round",
    evaluate: Callable[[str, Path], dict[str, Any]] | None = None,
    benchmarks: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The loop (see the module doc); ``data_stage(ctx)`` returns the round's data summary with its ``shards``."""
    from vpa_lightning.cli import cli_main, quiet_framework
    from vpa_lightning.export import export

    quiet_framework()
    if num_rounds < 1:
        raise ValueError(f"--num_rounds must be >= 1, got {num_rounds}")
    if not Path(fit_config).is_file():
        raise FileNotFoundError(f"--fit_config: no such file: {fit_config}")
    if reference not in ("round", "initial"):
        raise ValueError(f"--reference must be round or initial, got {reference!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    initial = None
    if evaluate is not None or benchmarks:
        initial = _load(out / "initial-eval" / "eval.json") or _evaluate(model, out / "initial-eval", evaluate, benchmarks)
    summaries: list[dict[str, Any]] = []
    policy = model
    for r in range(num_rounds):
        round_dir = out / f"round{r}"
        done = round_dir / "round.json"
        if done.exists():  # finished earlier: resume after it
            summary = json.loads(done.read_text())
            summaries.append(summary)
            policy = summary["model_out"]
            continue
        stages_path = round_dir / "stages.json"
        stages = _load(stages_path)
        ctx = RoundContext(round=r, dir=round_dir, policy=policy, seed=seed + r)

        def mark(name: str, value: dict[str, Any]) -> None:
            stages[name] = value
            write_text_atomic(stages_path, json.dumps(stages, indent=2) + "\n")

        if "data" not in stages:
            _say(f"round {r} ({r + 1} of {num_rounds}): data from {policy}")
            t0 = time.perf_counter()
            info = data_stage(ctx)
            mark("data", {**info, "seconds": time.perf_counter() - t0})
            _say(f"round {r} ({r + 1} of {num_rounds}): data done: {_brief(stages['data'])}")
        if "train" not in stages:
            _say(f"round {r} ({r + 1} of {num_rounds}): train on {stages['data']['shards']}")
            t0 = time.perf_counter()
            args = ["fit", "--config", fit_config, f"--model.model_name_or_path={policy}",
                    f"--data.train_shards={stages['data']['shards']}", f"--trainer.default_root_dir={round_dir / 'train'}",
                    # reference log-probs depend on the round's reference model: never share a cache across rounds
                    f"--model.reference_cache_dir={round_dir / 'reference-cache'}", f"--seed_everything={ctx.seed}"]
            if reference == "initial" and policy != model:
                args.append(f"--model.reference_model_name_or_path={model}")
            resume = _newest_checkpoint(round_dir / "train")  # a fit killed midway goes on from its checkpoint
            cli = cli_main([*args, *(fit_args or []), *([f"--ckpt_path={resume}"] if resume else [])])
            from vpa_lightning.callbacks import PreferenceReport

            metrics = _scalars(cli.trainer.callback_metrics)
            for cb in cli.trainer.callbacks:
                if isinstance(cb, PreferenceReport) and cb.after:
                    metrics.update({f"report/{k}": float(v) for k, v in cb.after.items()})
            checkpoint = (cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
                          if cli.trainer.checkpoint_callback is not None else "") or _newest_checkpoint(round_dir / "train")
            if not checkpoint:
                raise RuntimeError(f"round {r}: the fit wrote no checkpoint to export (keep trainer.enable_checkpointing)")
            mark("train", {"checkpoint": str(checkpoint), "metrics": metrics, "seconds": time.perf_counter() - t0})
        if "export" not in stages:
            t0 = time.perf_counter()
            if (round_dir / "model").exists():
                shutil.rmtree(round_dir / "model")
            written = export(stages["train"]["checkpoint"], round_dir / "model", merged=True)
            mark("export", {"model_out": os.fspath(written["merged"]),
                            "adapter": os.fspath(written["adapter"]) if "adapter" in written else None,
                            "seconds": time.perf_counter() - t0})
        if (evaluate is not None or benchmarks) and "eval" not in stages:
            t0 = time.perf_counter()
            if (round_dir / "eval").exists():
                shutil.rmtree(round_dir / "eval")
            mark("eval", {**_evaluate(stages["export"]["model_out"], round_dir / "eval", evaluate, benchmarks),
                          "seconds": time.perf_counter() - t0})
            _say(f"round {r} ({r + 1} of {num_rounds}): eval done: {_brief(stages['eval'])}")
        data = {k: v for k, v in stages["data"].items() if k != "seconds"}
        summary = {
            "round": r, "model_in": policy, **data, "train_dir": os.fspath(round_dir / "train"),
            "model_out": stages["export"]["model_out"], "adapter": stages["export"]["adapter"],
            "metrics": stages["train"]["metrics"], "eval": {k: v for k, v in stages.get("eval", {}).items() if k != "seconds"},
            "seconds": {name: stages[name]["seconds"] for name in ("data", "train", "export", "eval") if name in stages},
        }
        write_text_atomic(done, json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
        policy = summary["model_out"]
        _report(out, summaries, initial)
    _report(out, summaries, initial)
    return summaries


def _say(text: str) -> None:
    print(f"[vpa rounds] {text}", flush=True)


def _brief(values: dict[str, Any]) -> str:
    """``name value`` for a stage's numbers (floats to 3 digits)."""
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


def _evaluate(model: str, out: Path, evaluate: Callable[[str, Path], dict[str, Any]] | None,
              benchmarks: list[dict[str, Any]] | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if evaluate is not None:
        result.update(evaluate(model, out))
    if benchmarks:
        from vpa_lightning.eval.cli import run_eval
        from vpa_lightning.eval.runner import ModelSpec

        results = run_eval([ModelSpec(name="policy", path=model)], benchmarks, out_dir=str(out / "benchmarks"))
        result["benchmarks"] = results.get("models", {}).get("policy", {})
    write_text_atomic(out / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


def _report(out: Path, summaries: list[dict[str, Any]], initial: dict[str, Any] | None) -> None:
    """``rounds.json``, the ``rounds.md`` table and the ``rounds.png`` held-out curve of the rounds so far."""
    write_text_atomic(out / "rounds.json", json.dumps({"initial": initial, "rounds": summaries}, indent=2) + "\n")

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| round | held-out reward | sampled reward | prompts | pairs | all-tie prompts | data s | train s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if initial is not None:
        lines.append(f"| initial | {cell(initial.get('heldout_reward'))} | - | - | - | - | - | - | - |")
    for s in summaries:
        secs = s.get("seconds", {})
        lines.append(f"| {s['round']} | {cell(s.get('eval', {}).get('heldout_reward'))} | {cell(s.get('mean_reward'))} | "
                     f"{cell(s.get('prompts'))} | {cell(s.get('pairs'))} | {cell(s.get('all_tie_dropped'))} | "
                     f"{cell(secs.get('data'))} | {cell(secs.get('train'))} | {cell(secs.get('eval'))} |")
    write_text_atomic(out / "rounds.md", "\n".join(lines) + "\n")
    points = ([("initial", initial.get("heldout_reward"))] if initial else []) + [
        (str(s["round"]), s.get("eval", {}).get("heldout_reward")) for s in summaries]
    points = [(x, y) for x, y in points if y is not None]
    if points:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out reward")
        fig.tight_layout()
        tmp = out / ".rounds.png.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, out / "rounds.png")
