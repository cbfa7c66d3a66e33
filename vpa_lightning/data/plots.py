"""PNG plots of a build report (``report.json``): leaderboard, correlations, histograms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _bars(ax, hist: list[dict[str, Any]], title: str, xlabel: str) -> None:
    if not hist:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for h in hist:
        ax.bar(h["lo"], h["count"], width=h["hi"] - h["lo"], align="edge", color="#4472c4", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")


def render(directory: str | Path, report_name: str = "report.json") -> list[Path]:
    """Render the report of a build directory into PNG files next to it; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    directory = Path(directory)
    report = json.loads((directory / report_name).read_text())
    stem = report_name.removesuffix(".json")
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = directory / f"{stem}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    lb = report["leaderboard"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(lb), 2) + 1.2))
    if lb:
        names = [r["model"] for r in lb][::-1]
        ax.barh(names, [r["strength"] for r in lb][::-1], color="#70ad47")
    ax.set_title("Bradley-Terry leaderboard of the generating models")
    ax.set_xlabel("log-strength")
    save(fig, "leaderboard")

    corr = report["aspect_correlations"]
    aspects = sorted({c["a"] for c in corr} | {c["b"] for c in corr})
    fig, ax = plt.subplots(figsize=(1.2 * max(len(aspects), 2) + 2, 1.0 * max(len(aspects), 2) + 1.5))
    if aspects:
        idx = {a: i for i, a in enumerate(aspects)}
        m = [[1.0 if i == j else float("nan") for j in range(len(aspects))] for i in range(len(aspects))]
        for c in corr:
            if c["pearson"] is not None:
                m[idx[c["a"]]][idx[c["b"]]] = m[idx[c["b"]]][idx[c["a"]]] = c["pearson"]
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(aspects)), aspects, rotation=30, ha="right")
        ax.set_yticks(range(len(aspects)), aspects)
        for i in range(len(aspects)):
            for j in range(len(aspects)):
                if m[i][j] == m[i][j]:
                    ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center")
        fig.colorbar(im, ax=ax)
    ax.set_title("Aspect correlation (Pearson)")
    save(fig, "correlations")

    scores = report["histograms"]["scores"]
    fig, axes = plt.subplots(1, max(len(scores), 1), figsize=(4 * max(len(scores), 1), 3.2), squeeze=False)
    for ax, (aspect, hist) in zip(axes[0], sorted(scores.items())):
        _bars(ax, hist, aspect, "score")
    save(fig, "scores")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    _bars(axes[0], report["histograms"]["margins"], "Pair margins", "weighted mean score gap")
    _bars(axes[1], report["histograms"]["probabilities"], "Pair probabilities", "P(chosen beats rejected)")
    save(fig, "pairs")
    return written
