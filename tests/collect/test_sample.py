"""vpa sample with the hf backend on tiny local models: the image encoded once for the K answers, answers
determined by (seed, model, prompt) alone, a run killed with SIGKILL mid-file resumes to exactly the output of an
uninterrupted run, counts that add up, exit statuses through the console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.collect.conftest import DEMO_CHOICES  # noqa: F401 - shared with the judge tests
from tests.conftest import console_script
from vpa_lightning.collect.prompts import read_prompts
from vpa_lightning.collect.sample import SampleSettings, hf_sample, prompt_seed


def _vpa(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("vpa"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_k_answers_with_one_vision_pass_seeded_per_prompt(demo_prompts, family) -> None:
    from vpa_lightning.models import build_tiny_vlm

    model, processor = build_tiny_vlm(family)
    model.eval()
    prompt = read_prompts([demo_prompts])[0][0]
    tower = next(m for n, m in model.named_modules() if n.endswith(("vision_tower", "visual")))
    calls = []
    hook = tower.register_forward_hook(lambda m, args, kwargs_or_out: calls.append(1))
    try:
        settings = SampleSettings(k=4, temperature=1.0, top_p=1.0, max_new_tokens=12)
        first = hf_sample(model, processor, prompt, settings, seed=7)
    finally:
        hook.remove()
    assert len(calls) == 1  # one vision pass for the prompt's 4 answers
    assert len(first) == 4 and all(isinstance(t, str) and 0 < n <= 12 for t, n in first)
    assert len({t for t, _ in first}) > 1  # sampled, not 4 copies
    assert hf_sample(model, processor, prompt, settings, seed=7) == first
    assert hf_sample(model, processor, prompt, settings, seed=8) != first
    greedy = hf_sample(model, processor, prompt, SampleSettings(k=3, temperature=0.0, max_new_tokens=8), seed=1)
    assert len({t for t, _ in greedy}) == 1
    assert prompt_seed(0, "a", "p1") == prompt_seed(0, "a", "p1") != prompt_seed(0, "b", "p1")


def test_a_pool_of_two_models_into_one_vlfeedback_file(demo_prompts, tmp_path) -> None:
    out = tmp_path / "sampled.jsonl"
    proc = _vpa("sample", str(demo_prompts), "--model", "a=tiny:llava", "--model", "tiny:qwen2_vl", "--k", "2",
                "--max-new-tokens", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [json.loads(line) for line in demo_prompts.read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]
    for row, src in zip(rows, prompts):
        assert row["models"] == ["a", "tiny-qwen2_vl"] and [c["model"] for c in row["completions"]] == ["a"] * 2 + ["tiny-qwen2_vl"] * 2
        assert row["prompt"] == src["prompt"] and row["truth"] == src["truth"]
        assert (out.parent / row["img_path"]).resolve() == (demo_prompts.parent / src["img_path"]).resolve()
    summary = json.loads((tmp_path / "sampled.jsonl.summary.json").read_text())
    assert summary["prompts_in"] == summary["sampled"] + summary["rejected"] == len(prompts)
    assert summary["completions"] == 4 * len(prompts)
    assert all(m["prompts_per_s"] > 0 and m["tokens_per_s"] > 0 for m in summary["models"].values())
    assert "prompts/s" in proc.stdout


def test_killed_mid_file_resumes_to_the_uninterrupted_output(tmp_path) -> None:
    from vpa_lightning.data.demo import make_demo

    ann = make_demo(tmp_path / "demo", num_images=24, bad_records=False)
    args = ("sample", str(ann), "--model", "m=tiny:llava", "--k", "3", "--max-new-tokens", "16")
    straight = _vpa(*args, "--out", str(tmp_path / "straight.jsonl"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "resumed.jsonl"
    proc = subprocess.Popen([console_script("vpa"), *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    parts = tmp_path / "resumed.jsonl.parts"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            done = sum(p.read_bytes().count(b"\n") for p in parts.glob("*.jsonl")) if parts.is_dir() else 0
            if done >= 4:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # killed before the end: no output yet
    (part,) = parts.glob("*.jsonl")
    killed_at = part.read_bytes().count(b"\n")
    assert 4 <= killed_at < len(ann.read_text().splitlines())
    with open(part, "ab") as f:  # as a kill in the middle of a write leaves it
        f.write(b'{"id": "torn')
    resumed = _vpa(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    summary = json.loads((tmp_path / "resumed.jsonl.summary.json").read_text())
    assert summary["models"]["m"]["resumed"] == killed_at
    assert summary["models"]["m"]["sampled"] == summary["sampled"] - killed_at  # none twice, none lost


def test_rejected_prompts_and_exit_statuses(tmp_path, demo_prompts) -> None:
    rows = [json.loads(line) for line in demo_prompts.read_text().splitlines()][:2]
    rows[1]["img_path"] = "images/missing.png"
    bad = tmp_path / "p.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    (tmp_path / "images").symlink_to(demo_prompts.parent / "images")
    proc = _vpa("sample", str(bad), "--model", "tiny:llava", "--k", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rejects = [json.loads(line) for line in (tmp_path / "o.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["source"].rsplit(":", 1)[-1] for r in rejects] == ["2", "3"]
    assert "not found" in rejects[0]["reason"] and "invalid JSON" in rejects[1]["reason"]
    summary = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    assert (summary["prompts_in"], summary["sampled"], summary["rejected"]) == (3, 1, 2)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{broken\n")
    proc = _vpa("sample", str(only_bad), "--model", "tiny:llava", "--out", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "no usable prompt" in proc.stderr and "Traceback" not in proc.stderr
    proc = _vpa("sample", str(demo_prompts), "--out", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "--model" in proc.stderr
    proc = _vpa("sample", str(demo_prompts), "--model", "tiny:llava", "--k", "0", "--out", str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and "k must be >= 1" in proc.stderr
    proc = _vpa("sample", "--no-such-flag")
    assert proc.returncode == 2
