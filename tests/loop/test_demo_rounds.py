"""``vpa demo --rounds``: the on-policy loop on the demo world through the console script (small here), its table,
its resume (a rerun redoes nothing), and its flags' errors."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import console_script

pytest.importorskip("torch")


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("vpa"), "demo", *args], capture_output=True, text=True, timeout=900)


def test_demo_rounds_run_print_their_table_and_resume(tmp_path) -> None:
    out = tmp_path / "demo"
    args = ("--rounds", "1", "--num-images", "120", "--k", "6", "--start-epochs", "8", "--round-epochs", "1",
            "--out", str(out))
    proc = _demo(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 0 (1 of 1): data" in proc.stdout and "starting policy:" in proc.stdout  # a line per stage
    table = proc.stdout[proc.stdout.index("on-policy rounds ("):]
    assert "| initial |" in table and "| 0 |" in table
    summary = json.loads((out / "rounds" / "rounds.json").read_text())
    (row,) = summary["rounds"]
    assert row["model_in"] == str(out / "start" / "model" / "merged")  # round 0 samples from the starting policy
    assert row["pairs"] > 0 and 0.0 <= row["eval"]["heldout_reward"] <= 1.0
    sampled = [json.loads(line) for line in (out / "rounds" / "round0" / "sample" / "sampled.jsonl").read_text().splitlines()]
    heldout = {json.loads(line)["img_path"] for line in (out / "data" / "heldout.jsonl").read_text().splitlines()}
    assert heldout and not heldout & {s["img_path"] for s in sampled}  # held-out images are never sampled
    assert summary["initial"]["heldout_prompts"] == len((out / "data" / "heldout.jsonl").read_text().splitlines())
    again = _demo(*args)  # everything is there: nothing is sampled or trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "round 0 (1 of 1): data" not in again.stdout and "starting policy:" not in again.stdout
    assert json.loads((out / "rounds" / "rounds.json").read_text()) == summary


def test_demo_rounds_flags_are_checked(tmp_path) -> None:
    proc = _demo("--rounds", "1", "--max-epochs", "2", "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "--round-epochs" in proc.stderr
    proc = _demo("--rounds", "1", "--k", "1", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "--k" in proc.stderr
    assert not (tmp_path / "b").exists()
