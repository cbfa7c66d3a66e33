"""``vpa report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page of training curves and evaluations.

Each RUN_DIR is searched recursively for

* training logs: TensorBoard event files (``events.out.tfevents.*``, scalars only) and Lightning
  ``CSVLogger`` files (``metrics.csv``), with the metric names of
  :mod:`vpa_lightning.module` (``train/loss``, ``val/rewards/accuracies``, ...);
* evaluation results: every ``results.json`` with the ``{"models": {model: {benchmark:
  {metric: value}}}, "counts": ..., "rejects": ...}`` layout written by ``vpa eval``.

The output directory gets ``index.html`` plus one PNG per metric group next to it, referenced by
relative path, so the page opens from disk with no server. It holds the curves (one line per run,
train solid, validation dashed), the last logged value of every metric per run, a before/after
table per results file (rows = benchmark/metric, columns = models, plus the delta of each model
vs the first one), and the counts/rejects summary. Missing pieces are noted on the page; only a
RUN_DIR that does not exist is an error.

Usage::

    vpa report runs/dpo runs/mdpo --out reports/cmp --title "DPO vs mDPO"
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["METRIC_GROUPS", "RunData", "collect_run", "main", "render_report"]

#: One PNG per group: file stem -> (title, metrics without the ``train/`` / ``val/`` prefix).
METRIC_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "loss": ("Loss", ("loss",)),
    "accuracies": ("Reward accuracy", ("rewards/accuracies",)),
    "margins": ("Reward margin", ("rewards/margins",)),
    "rewards": ("Rewards (chosen / rejected)", ("rewards/chosen", "rewards/rejected")),
    "logps": ("Log-probs (chosen / rejected)", ("logps/chosen", "logps/rejected")),
}
#: Logged stage -> matplotlib line style.
STAGES: dict[str, str] = {"train": "-", "val": "--"}
Series = dict[str, dict[int, float]]  # tag -> step -> value


@dataclass
class RunData:
    """What one RUN_DIR holds: scalar series, evaluation results and notes for the page."""

    name: str
    path: Path
    scalars: Series = field(default_factory=dict)
    log_files: list[Path] = field(default_factory=list)
    results: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def _read_tensorboard(path: Path) -> Series:
    """Scalars of one event file (imports TensorBoard only when there is one to read)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag: {int(e.step): float(e.value) for e in acc.Scalars(tag)} for tag in acc.Tags().get("scalars", [])}


def _read_csv(path: Path) -> Series:
    """Metric columns of a Lightning ``metrics.csv`` (sparse: empty cells are skipped)."""
    series: Series = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.DictReader(handle)):
            try:
                step = int(float(row.get("step") or row_number))
            except ValueError:
                step = row_number
            for column, cell in row.items():
                if column in ("step", "epoch") or column is None or cell in (None, ""):
                    continue
                try:
                    series.setdefault(column, {})[step] = float(cell)
                except ValueError:
                    continue
    return series


#: Log-file readers: glob pattern -> reader.
LOG_READERS: dict[str, Any] = {"events.out.tfevents.*": _read_tensorboard, "metrics.csv": _read_csv}


def _normalise(tag: str) -> str:
    """``train/loss_step`` (Lightning's name when a metric is logged per step and per epoch) -> ``train/loss``."""
    return tag.removesuffix("_step")


def collect_run(path: Path, name: str) -> RunData:
    """Read every log file and results file under ``path`` (recursively)."""
    run = RunData(name=name, path=path)
    for pattern, reader in LOG_READERS.items():
        for file in sorted(path.rglob(pattern)):
            try:
                series = reader(file)
            except Exception as err:  # noqa: BLE001 - a corrupt log is noted, the rest of the report still builds
                run.notes.append(f"could not read {file.relative_to(path)}: {err}")
                continue
            run.log_files.append(file)
            for tag, points in series.items():
                run.scalars.setdefault(_normalise(tag), {}).update(points)  # later versions win per step
    for file in sorted(path.rglob("results.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            run.notes.append(f"could not read {file.relative_to(path)}: {err}")
            continue
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            run.results.append((file, data))
        else:
            run.notes.append(f"{file.relative_to(path)} has no \"models\" mapping; skipped")
    if not run.log_files:
        run.notes.append("no training logs (events.out.tfevents.* or metrics.csv) found")
    if not run.results:
        run.notes.append("no evaluation results (results.json) found")
    return run


# ----------------------------------------------------------------------------- plotting
def _plot_group(runs: list[RunData], stem: str, title: str, metrics: tuple[str, ...], out: Path) -> Path | None:
    """One PNG (a panel per metric, a line per run and stage); ``None`` when no run logged it."""
    tags = [f"{stage}/{metric}" for metric in metrics for stage in STAGES]
    if not any(run.scalars.get(tag) for run in runs for tag in tags):
        return None
    import matplotlib

    matplotlib.use("Agg")  # file output only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        for index, run in enumerate(runs):
            for stage, style in STAGES.items():
                points = run.scalars.get(f"{stage}/{metric}")
                if not points:
                    continue
                steps = sorted(points)
                ax.plot(
                    steps,
                    [points[s] for s in steps],
                    linestyle=style,
                    marker="o" if len(steps) < 30 else None,  # sparse (validation) points stay visible
                    markersize=3,
                    color=colors[index % len(colors)],
                    label=f"{run.name} {stage}",
                )
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    png = out / f"curves_{stem}.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------- HTML
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    """Numbers with 4 significant digits; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    """An HTML table of already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else ``{}`` (a malformed entry shows as missing, not a crash)."""
    return value if isinstance(value, dict) else {}


def _results_section(label: str, data: dict[str, Any]) -> str:
    """Before/after table of one results file, then its counts and rejects."""
    models: dict[str, dict[str, dict[str, Any]]] = data["models"]
    names = list(models)
    parts = [f"<h3>{_e(label)}</h3>"]
    keys: list[tuple[str, str]] = []  # (benchmark, metric) in first-seen order
    for results in models.values():
        for bench, metrics in _dict(results).items():
            for metric in _dict(metrics):
                if (bench, metric) not in keys:
                    keys.append((bench, metric))
    if not names or not keys:
        parts.append('<p class="note">No evaluation metrics in this file.</p>')
    else:
        header = ["benchmark", "metric"] + [_e(n) for n in names] + [f"Δ {_e(n)} vs {_e(names[0])}" for n in names[1:]]
        rows = []
        for bench, metric in keys:
            values = [_dict(_dict(models[n]).get(bench)).get(metric) for n in names]
            base = values[0]
            deltas = [
                _fmt(v - base) if isinstance(v, (int, float)) and isinstance(base, (int, float)) else "–"
                for v in values[1:]
            ]
            deltas = [d if d in ("–", "nan") or d.startswith("-") else "+" + d for d in deltas]
            rows.append([_e(bench), _e(metric)] + [_e(_fmt(v)) for v in values] + [_e(d) for d in deltas])
        parts.append(_table(header, rows, "results"))
    counts = data.get("counts") or {}
    rejects = data.get("rejects") or {}
    if counts:
        rows = [
            [_e(b)] + [_e(_fmt(_dict(c).get(k))) for k in ("lines", "items", "rejected")] for b, c in _dict(counts).items()
        ]
        parts.append("<h4>Counts</h4>" + _table(["benchmark", "lines", "items", "rejected"], rows, "counts"))
    if rejects:
        parts.append("<h4>Rejected lines</h4>")
        for bench, entries in _dict(rejects).items():
            listed = entries if isinstance(entries, list) else [entries]
            shown = "".join(f"<li>{_e(_reject_text(r))}</li>" for r in listed[:20])
            more = f"<li>… {len(listed) - 20} more</li>" if len(listed) > 20 else ""
            parts.append(f"<details><summary>{_e(bench)}: {len(listed)}</summary><ul>{shown}{more}</ul></details>")
    return "\n".join(parts)


def _reject_text(reject: Any) -> str:
    if isinstance(reject, dict) and {"file", "line", "reason"} <= set(reject):
        return f"{reject['file']}:{reject['line']}: {reject['reason']}"
    return json.dumps(reject, ensure_ascii=False) if not isinstance(reject, str) else reject


def _last_values(runs: list[RunData]) -> str:
    """Last logged value of every train/val metric, one column per run."""
    tags = sorted({t for run in runs for t in run.scalars if t.split("/", 1)[0] in STAGES})
    if not tags:
        return '<p class="note">No training metrics logged by any run.</p>'
    rows = []
    for tag in tags:
        cells = []
        for run in runs:
            points = run.scalars.get(tag)
            cells.append(_e(f"{_fmt(points[max(points)])} @ {max(points)}") if points else "–")
        rows.append([_e(tag)] + cells)
    return _table(["metric"] + [_e(r.name) for r in runs], rows, "last")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left}.note{color:#a60}img{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:0 3px}"""


def render_report(runs: list[RunData], out: Path, title: str) -> Path:
    """Write the PNGs and ``index.html`` into ``out``; the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{_e(title)}</h1>", "<h2>Runs</h2><ul>"]
    for run in runs:
        notes = "".join(f'<li class="note">{_e(n)}</li>' for n in run.notes)
        body.append(
            f"<li><b>{_e(run.name)}</b> <code>{_e(run.path)}</code>: {len(run.log_files)} log file(s), "
            f"{len(run.scalars)} metric(s), {len(run.results)} results file(s)<ul>{notes}</ul></li>"
        )
    body.append("</ul><h2>Training curves</h2>")
    for stem, (group_title, metrics) in METRIC_GROUPS.items():
        png = _plot_group(runs, stem, group_title, metrics, out)
        if png is None:
            body.append(f'<p class="note">{_e(group_title)}: not logged by any run.</p>')
        else:
            body.append(f'<h3>{_e(group_title)}</h3><img src="{_e(png.name)}" alt="{_e(group_title)}">')
    body.append("<h2>Last logged values</h2>" + _last_values(runs))
    body.append("<h2>Evaluations</h2>")
    sections = [
        _results_section(f"{run.name}: {file.relative_to(run.path)}", data) for run in runs for file, data in run.results
    ]
    body.extend(sections or ['<p class="note">No evaluation results in any run.</p>'])
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _run_names(paths: list[Path]) -> list[str]:
    """Directory names, or the paths as given where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def main(argv: list[str] | None = None) -> Path:
    """``vpa report``: parse ``argv`` (``None`` = ``sys.argv[1:]``), write the report, return ``index.html``."""
    parser = argparse.ArgumentParser(prog="vpa report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR[0]/report)")
    parser.add_argument("--title", default="vpa report", help="page title")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.run_dirs if not p.is_dir()]
    if missing:
        parser.error(f"run directory not found: {', '.join(missing)}")
    out: Path = args.out or args.run_dirs[0] / "report"
    runs = [collect_run(p, n) for p, n in zip(args.run_dirs, _run_names(args.run_dirs))]
    index = render_report(runs, out, args.title)
    print(index)
    return index


if __name__ == "__main__":
    main()
