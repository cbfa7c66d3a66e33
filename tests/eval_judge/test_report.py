"""``vpa report``: real TensorBoard + CSV training logs and a results.json -> one HTML page with PNGs."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vpa_lightning.eval.report import main

METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
EVIL = "<script>alert(1)</script>"
VOID = {"meta", "img", "br", "hr", "link", "input"}


class PageParser(HTMLParser):
    """Checks that tags balance; collects img sources, tag names and the cells of every table."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()
        self.imgs: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}  # class -> rows (header row first)
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attr = dict(attrs)
        if tag == "img":
            self.imgs.append(attr["src"] or "")
        if tag == "table":
            self._table = attr.get("class") or ""
            self.tables[self._table] = []
        if tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        if tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _tensorboard_run(root: Path) -> None:
    """Run A: train metrics every step 0..9, val metrics at steps 4 and 9 (torch's SummaryWriter)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(root / "lightning_logs" / "version_0"))
    for step in range(10):
        for i, metric in enumerate(METRICS):
            writer.add_scalar(f"train/{metric}", 1.0 / (step + 1) + i, step)
        if step in (4, 9):
            for metric in METRICS:
                writer.add_scalar(f"val/{metric}", 0.5 + step / 100, step)
    writer.close()


def _csv_run(root: Path) -> None:
    """Run B: a Lightning CSVLogger file (sparse rows: train per step, val per epoch)."""
    path = root / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    columns = ["epoch", "step"] + [f"train/{m}" for m in METRICS] + [f"val/{m}" for m in METRICS]
    lines = [",".join(columns)]
    for step in range(6):
        lines.append(",".join(["0", str(step)] + [str(0.7 - step / 20)] * len(METRICS) + [""] * len(METRICS)))
    lines.append(",".join(["0", "5"] + [""] * len(METRICS) + ["0.42"] * len(METRICS)))
    path.write_text("\n".join(lines) + "\n")


def _results(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "models": {
            "base": {"pope": {"accuracy": 0.8, "f1": 0.75}, "mmvet": {"total": 30.0}},
            EVIL: {"pope": {"accuracy": 0.85, "f1": 0.7}, "mmvet": {"total": 33.5}},
        },
        "rejects": {"pope": [{"file": "pope.jsonl", "line": 7, "reason": "missing field <label>"}]},
        "counts": {"pope": {"lines": 11, "items": 10, "rejected": 1}, "mmvet": {"lines": 4, "items": 4, "rejected": 0}},
    }
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, PageParser]:
    tmp = tmp_path_factory.mktemp("report")
    _tensorboard_run(tmp / "runA")
    _results(tmp / "runA" / "eval" / "results.json")
    _csv_run(tmp / "runB")
    (tmp / "runC").mkdir()  # neither logs nor evals
    index = main([str(tmp / "runA"), str(tmp / "runB"), str(tmp / "runC"), "--out", str(tmp / "out"), "--title", "A & B"])
    text = index.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return index, text, parser


def test_page_is_well_formed(report: tuple[Path, str, PageParser]) -> None:
    index, text, parser = report
    assert index.name == "index.html" and text.startswith("<!DOCTYPE html>")
    assert parser.errors == [] and parser.stack == []  # every tag closed, in order
    assert "<title>A &amp; B</title>" in text


def test_curves_are_valid_pngs(report: tuple[Path, str, PageParser]) -> None:
    from PIL import Image

    index, _, parser = report
    # One PNG per metric group (both runs log every group), referenced relative to the page.
    assert sorted(parser.imgs) == sorted(f"curves_{g}.png" for g in ("loss", "accuracies", "margins", "rewards", "logps"))
    for src in parser.imgs:
        assert "/" not in src and not src.startswith("data:")
        with Image.open(index.parent / src) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()


def test_results_table_values_and_deltas(report: tuple[Path, str, PageParser]) -> None:
    _, _, parser = report
    header, *rows = parser.tables["results"]
    assert header == ["benchmark", "metric", "base", EVIL, f"Δ {EVIL} vs base"]
    assert rows == [
        ["pope", "accuracy", "0.8", "0.85", "+0.05"],  # 0.85 - 0.8
        ["pope", "f1", "0.75", "0.7", "-0.05"],  # 0.7 - 0.75
        ["mmvet", "total", "30", "33.5", "+3.5"],  # 33.5 - 30
    ]
    assert parser.tables["counts"][1:] == [["pope", "11", "10", "1"], ["mmvet", "4", "4", "0"]]


def test_text_is_escaped(report: tuple[Path, str, PageParser]) -> None:
    _, text, parser = report
    assert "script" not in parser.tags  # the model name stayed text
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "missing field &lt;label&gt;" in text and "pope.jsonl:7" in text


def test_last_values_and_notes(report: tuple[Path, str, PageParser]) -> None:
    _, text, parser = report
    header, *rows = parser.tables["last"]
    assert header == ["metric", "runA", "runB", "runC"]
    by_metric = {r[0]: r[1:] for r in rows}
    assert by_metric["train/loss"] == ["0.1 @ 9", "0.45 @ 5", "–"]  # A: 1/(9+1) + 0 at step 9; B: 0.7 - 5/20
    assert by_metric["train/rewards/accuracies"][0] == "3.1 @ 9"  # A: 1/(9+1) + 3 (4th metric)
    assert by_metric["val/rewards/accuracies"] == ["0.59 @ 9", "0.42 @ 5", "–"]  # A: 0.5 + 9/100
    assert set(by_metric) == {f"{s}/{m}" for s in ("train", "val") for m in METRICS}
    assert "no training logs" in text and "no evaluation results (results.json) found" in text  # run C


def test_missing_run_dir_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])
    assert "run directory not found" in capsys.readouterr().err


def test_empty_run_via_vpa_cli(tmp_path: Path) -> None:
    """``vpa report`` dispatch; a run with nothing in it still gives a page (default --out)."""
    from vpa_lightning.cli import main as vpa

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"not": "an eval file"}')
    index = vpa(["report", str(tmp_path / "run")])
    assert index == tmp_path / "run" / "report" / "index.html"
    text = index.read_text()
    assert "not logged by any run" in text and "No evaluation results in any run" in text
    assert "has no &quot;models&quot; mapping" in text


def test_import_is_cheap() -> None:
    code = "import sys, vpa_lightning.eval.report; print([m for m in ('torch', 'matplotlib', 'tensorboard') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
