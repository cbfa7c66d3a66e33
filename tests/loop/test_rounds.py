"""vpa rounds: two on-policy rounds on tiny models through the console script (each round sampled from the previous
round's policy), a failure inside each stage resumed to exactly the uninterrupted run, and the bad inputs that must
stop a round with a clear message without anything half-written being taken as finished."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import console_script

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Demo-world prompts for sampling and held-out prompts, and a small LoRA fit config."""
    from vpa_lightning.data.demo import make_demo

    root = tmp_path_factory.mktemp("loop")
    ann = make_demo(root / "world", num_images=12, bad_records=False)
    rows = ann.read_text().splitlines()
    (root / "prompts.jsonl").write_text("\n".join(rows[:10]) + "\n")
    (root / "heldout.jsonl").write_text("\n".join(rows[10:]) + "\n")
    fit = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": []},
        "model": {"model_name_or_path": "tiny:llava", "lora": True, "lora_r": 4, "lora_alpha": 8, "learning_rate": 0.01,
                  "lora_dropout": 0.0},
        "data": {"train_shards": "set/per/round", "batch_size": 2, "max_length": 160},
    }
    (root / "fit.yaml").write_text(yaml.safe_dump(fit))
    return {"root": root, "prompts": root / "prompts.jsonl", "heldout": root / "heldout.jsonl", "fit": root / "fit.yaml",
            "images": ann.parent}


def _args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny:llava", "--prompts", json.dumps([str(world["prompts"])]), "--out_dir", str(out),
            "--fit_config", str(world["fit"]), "--judge", "hf", "--judge_model", "tiny:llava", "--k", "3",
            "--max_new_tokens", "8", "--val_fraction", "0", "--image_root", str(world["images"]), *extra]


def _digest(folder: Path) -> dict[str, str]:
    """Digests of a round's shards (member by member; a sample's ``source`` names the judged file's path, which
    differs between two output folders) and of its exported weights (bytes)."""
    import tarfile

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".safetensors":
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.suffix == ".tar":
            h = hashlib.sha256()
            with tarfile.open(p) as tf:
                for m in tf.getmembers():
                    data = tf.extractfile(m).read()
                    if m.name.endswith(".json"):
                        data = json.dumps({k: v for k, v in json.loads(data).items() if k != "source"}, sort_keys=True).encode()
                    h.update(m.name.encode() + b"\0" + data)
            out[str(p.relative_to(folder))] = h.hexdigest()
    return out


def test_two_rounds_through_the_console_script(world, tmp_path) -> None:
    from vpa_lightning.collect.prompts import read_prompts
    from vpa_lightning.collect.sample import SampleSettings, hf_sample, prompt_seed
    from vpa_lightning.models import build_tiny_vlm

    out = tmp_path / "rounds"
    proc = subprocess.run([console_script("vpa"), "rounds", *_args(world, out, "--num_rounds", "2", "--heldout_prompts",
                                                                    json.dumps([str(world["heldout"])]))],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "rounds.json").read_text())
    r0, r1 = report["rounds"]
    assert r0["model_in"] == "tiny:llava" and r1["model_in"] == r0["model_out"]
    assert report["initial"]["heldout_reward"] is not None and all(r["eval"]["heldout_reward"] is not None for r in (r0, r1))
    for r in (r0, r1):
        assert r["pairs"] > 0 and r["completions"] == 3 * 10 and set(r["seconds"]) == {"data", "train", "export", "eval"}
        assert Path(r["adapter"]).is_dir() and Path(r["model_out"]).is_dir()
    assert (out / "rounds.md").read_text().count("\n") == 2 + 1 + 2 and (out / "rounds.png").stat().st_size > 0
    # round 1 sampled from round 0's policy: the initial model, asked with round 1's seed, answers otherwise
    sampled = [json.loads(line) for line in (out / "round1" / "sample" / "sampled.jsonl").read_text().splitlines()]
    prompt = read_prompts([world["prompts"]], image_root=world["images"])[0][0]
    model, processor = build_tiny_vlm("llava")
    initial = hf_sample(model.eval(), processor, prompt, SampleSettings(k=3, max_new_tokens=8, seed=1),
                        prompt_seed(1, "policy", prompt.id))
    assert [c["response"] for c in sampled[0]["completions"]] != [t for t, _ in initial]
    # a rerun resumes after the finished rounds: nothing sampled or trained again
    again = subprocess.run([console_script("vpa"), "rounds", *_args(world, out, "--num_rounds", "2", "--heldout_prompts",
                                                                     json.dumps([str(world["heldout"])]))],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads((out / "rounds.json").read_text())["rounds"] == [r0, r1]


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory) -> dict[str, str]:
    """One uninterrupted round: the digests of its shards and exported weights."""
    from vpa_lightning.loop.cli import rounds

    out = tmp_path_factory.mktemp("straight")
    rounds(**_kwargs(world, out))
    return _digest(out / "round0")


def _kwargs(world: dict[str, Path], out: Path) -> dict:
    return {"model": "tiny:llava", "prompts": [str(world["prompts"])], "out_dir": str(out), "fit_config": str(world["fit"]),
            "num_rounds": 1, "judge": "hf", "judge_model": "tiny:llava", "k": 3, "max_new_tokens": 8,
            "val_fraction": 0.0, "image_root": str(world["images"]), "heldout_prompts": [str(world["heldout"])]}


class Killed(Exception):
    pass


def _fail_once(monkeypatch, target: str, after: int = 0) -> None:
    """Make ``module.attr`` raise the first time it is called after ``after`` calls (a kill in that stage)."""
    import importlib

    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable prefix, then attributes (a class's method)
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
            break
        except ModuleNotFoundError:
            continue
    for name in parts[cut:-1]:
        owner = getattr(owner, name)
    module, attr = owner, parts[-1]
    original = getattr(module, attr)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise Killed(target)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attr, failing)


@pytest.mark.parametrize(("stage", "target", "after"), [
    ("sample", "vpa_lightning.collect.sample.hf_sample", 4),  # 4 prompts sampled, then the kill
    ("judge", "vpa_lightning.collect.judge._HFJudge.rate", 5),
    ("build", "vpa_lightning.data.build", 0),
    ("train", "vpa_lightning.module.VisionDPOModule.training_step", 7),  # mid second epoch: resumes from the first
    ("export", "vpa_lightning.export.export", 0),
    ("eval", "vpa_lightning.loop.rounds.heldout_reward", 1),  # the initial model evaluated, then the round's killed
])
def test_a_kill_in_each_stage_resumes_to_the_uninterrupted_run(world, straight, tmp_path, monkeypatch, stage, target, after):
    from vpa_lightning.loop.cli import rounds

    out = tmp_path / "rounds"
    with monkeypatch.context() as m:
        _fail_once(m, target, after)
        with pytest.raises((Killed, SystemExit)):
            rounds(**_kwargs(world, out))
    assert not (out / "round0" / "round.json").exists()  # nothing half-done taken as finished
    stages = json.loads((out / "round0" / "stages.json").read_text()) if (out / "round0" / "stages.json").exists() else {}
    assert stage not in stages
    rounds(**_kwargs(world, out))
    assert _digest(out / "round0") == straight


def test_bad_inputs_stop_the_round_with_a_reason(world, tmp_path, monkeypatch) -> None:
    from vpa_lightning.loop.cli import rounds

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable prompt"):
        rounds(**{**_kwargs(world, tmp_path / "a"), "prompts": [str(empty)]})
    # greedy sampling: the K answers of every prompt are one answer, all tie, no pair
    with pytest.raises(RuntimeError, match="no pairs to train on: every prompt's answers tied"):
        rounds(**{**_kwargs(world, tmp_path / "b"), "temperature": 0.0})
    assert not (tmp_path / "b" / "round0" / "round.json").exists()
    assert "data" not in json.loads((tmp_path / "b" / "round0" / "stages.json").read_text() or "{}") \
        if (tmp_path / "b" / "round0" / "stages.json").exists() else True
    # a judge that rejects every answer: the judging step stops, nothing taken as finished
    from vpa_lightning.collect import judge as judge_module
    from vpa_lightning.collect.rubrics import RubricError

    monkeypatch.setattr(judge_module._HFJudge, "rate", lambda self, prompt, answers, *media: [RubricError("refused")] * len(answers))
    with pytest.raises(RuntimeError, match="no completion was rated"):
        rounds(**_kwargs(world, tmp_path / "c"))
    assert not (tmp_path / "c" / "round0" / "round.json").exists()
    with pytest.raises(ValueError, match="--reference_field"):
        rounds(**{**_kwargs(world, tmp_path / "d"), "judge": "rule"})
    proc = subprocess.run([console_script("vpa"), "rounds", "--model", "tiny:llava", "--no_such_option", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    # through the console script: a clear message and exit status 2, no traceback
    args = _args(world, tmp_path / "e")
    args[args.index("--prompts") + 1] = json.dumps([str(empty)])
    proc = subprocess.run([console_script("vpa"), "rounds", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no usable prompt" in proc.stderr and "Traceback" not in proc.stderr


def test_a_pool_answers_instead_of_the_policy(world, tmp_path) -> None:
    """Silkie-style distillation: ``pool`` models answer, the policy does not (``policy_in_pool: false``); each pool
    entry keeps its own sampling settings; bad pool entries are named."""
    from vpa_lightning.loop.cli import rounds

    out = tmp_path / "distill"
    pool = [{"name": "teacher-a", "model": "tiny:llava", "k": 2, "temperature": 1.0},
            {"name": "teacher-b", "model": "tiny:llava", "k": 3}]
    (summary,) = rounds(**{**_kwargs(world, out), "pool": pool, "policy_in_pool": False, "heldout_prompts": None})
    rows = [json.loads(line) for line in (out / "round0" / "sample" / "sampled.jsonl").read_text().splitlines()]
    for row in rows:
        assert sorted(c["model"] for c in row["completions"]) == ["teacher-a"] * 2 + ["teacher-b"] * 3
    assert summary["completions"] == 5 * len(rows) and summary["pairs"] > 0
    with pytest.raises(ValueError, match="--pool"):
        rounds(**{**_kwargs(world, tmp_path / "a"), "policy_in_pool": False})
    with pytest.raises(ValueError, match=r"--pool: unknown field\(s\) \['temprature'\]"):
        rounds(**{**_kwargs(world, tmp_path / "b"), "pool": [{"name": "x", "model": "tiny:llava", "temprature": 1}]})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_served_policy_is_started_for_sampling_and_stopped(world, tmp_path, monkeypatch) -> None:
    """--serve_command: the round's policy is served (here by `vpa serve`, as vLLM would) while the round samples
    through the openai backend, and the server is gone before the fit; a server that dies or never answers stops
    the round with its exit status or the timeout, and its log."""
    from vpa_lightning.loop.cli import rounds
    from vpa_lightning.loop.server import _ready

    monkeypatch.setenv("VPA_SAMPLE_API_KEY", "EMPTY")
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1"
    out = tmp_path / "served"
    command = f"{console_script('vpa')} serve {{model}} --port {port} --name policy"
    (summary,) = rounds(**{**_kwargs(world, out), "backend": "openai", "base_url": base, "served_name": "policy",
                           "serve_command": command, "heldout_prompts": None, "cache_dir": str(tmp_path / "cache")})
    assert summary["pairs"] > 0 and not _ready(base)  # trained, and the server is stopped
    stats = json.loads((out / "round0" / "sample" / "sampled.jsonl.summary.json").read_text())["models"]["policy"]
    assert stats["backend"] == "openai" and stats["requests"]["requests_sent"] == summary["prompts"]
    assert '"serving": "policy"' in (out / "round0" / "sample" / "serve.log").read_text()

    dying = f"{sys.executable} -c 'import sys; print(\"no GPU\"); sys.exit(3)'"
    with pytest.raises(RuntimeError, match=r"exited with status 3 .*serve\.log"):
        rounds(**{**_kwargs(world, tmp_path / "dies"), "backend": "openai", "base_url": base,
                  "serve_command": dying, "heldout_prompts": None})
    assert "no GPU" in (tmp_path / "dies" / "round0" / "sample" / "serve.log").read_text()
    silent = f"{sys.executable} -c 'import time; time.sleep(60)'"
    with pytest.raises(RuntimeError, match="did not answer within 2 s"):
        rounds(**{**_kwargs(world, tmp_path / "silent"), "backend": "openai", "base_url": base,
                  "serve_command": silent, "serve_timeout": 2, "heldout_prompts": None})
    with pytest.raises(ValueError, match="--serve_command needs --backend openai"):
        rounds(**{**_kwargs(world, tmp_path / "hf"), "serve_command": silent, "heldout_prompts": None})
