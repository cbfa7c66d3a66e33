"""The ``vpa-shard`` command line: build, inspect, report, merge, demo."""

import json
import re
import subprocess
import sys

from vpa_lightning.data.cli import main

from .conftest import make_dataset


def test_build_inspect_report_merge(tmp_path, capsys):
    files = make_dataset(tmp_path, n_images=12)
    out = tmp_path / "out"
    assert main(["build", *map(str, files), "--out", str(out), "--strategy", "best-vs-worst",
                 "--aspects", "Helpfulness=2,Visual Faithfulness=1,Ethical Considerations=1",
                 "--max-samples-per-shard", "4"]) == 0
    text = capsys.readouterr().out
    assert "records_in" in text and re.search(r"in = used \+ dedup \+ rejected +yes", text)
    assert (out / "report-leaderboard.png").stat().st_size > 1000
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["strategy"] == "best-vs-worst"
    assert m["config"]["aspects"][0] == ["Helpfulness", 2.0]

    assert main(["inspect", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Bradley-Terry leaderboard" in text and "model-0" in text

    for i in range(2):
        assert main(["build", *map(str, files), "--out", str(tmp_path / "parts"), "--partition", f"{i}/2", "--no-plots"]) == 0
    assert main(["merge", str(tmp_path / "parts")]) == 0
    assert (tmp_path / "parts" / "manifest.json").exists()


def test_errors_exit_with_the_flag_named(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("")
    assert main(["build", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o"), "--partition", "2/2"]) == 2
    assert "--partition" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o"), "--partition", "two"]) == 2
    assert main(["build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1


def test_demo_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vpa_lightning.data.cli", "demo", str(tmp_path / "d"), "--num-images", "30"],
                          capture_output=True, text=True, check=True)
    assert "vpa-shard summary" in proc.stdout
    m = json.loads((tmp_path / "d" / "shards" / "manifest.json").read_text())
    c = m["counts"]
    assert c["records_rejected"] == 2 and c["responses_rejected"] == 1  # the three planted bad lines
    assert c["groups"] > 30 and c["pairs"] >= 6 * (c["groups"] - 1)
    lb = json.loads((tmp_path / "d" / "shards" / "report.json").read_text())["leaderboard"]
    assert [r["model"] for r in lb] == ["careful-vlm", "terse-vlm", "guessing-vlm", "dreaming-vlm"]


def test_vpa_shard_console_script_exit_statuses(tmp_path):
    """The installed ``vpa-shard`` script: 0 on success, 2 for a bad flag or option, 1 for a failed run."""
    from tests.conftest import console_script

    script = console_script("vpa-shard")

    def run(*args):
        return subprocess.run([script, *map(str, args)], capture_output=True, text=True, timeout=120)

    ok = run("demo", tmp_path / "d", "--num-images", "6", "--no-plots")
    assert ok.returncode == 0, ok.stderr
    assert run("inspect", tmp_path / "d" / "shards").returncode == 0
    bad_flag = run("build", tmp_path / "d" / "data" / "annotations.jsonl", "--out", tmp_path / "o", "--no-such-flag")
    assert bad_flag.returncode == 2 and "--no-such-flag" in bad_flag.stderr
    bad_value = run("build", tmp_path / "d" / "data" / "annotations.jsonl", "--out", tmp_path / "o", "--partition", "two")
    assert bad_value.returncode == 2 and "--partition" in bad_value.stderr
    failed = run("inspect", tmp_path / "nothing-here")
    assert failed.returncode == 1 and "nothing-here" in failed.stdout + failed.stderr
