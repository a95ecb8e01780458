"""Plots of evaluation results: accuracy against n_way, one line per n_shot, 95% CIs as error bars.
matplotlib (the `train` extra) is imported only when a plot is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from model.evaluate import EvalResult


def plot_accuracy(
    results: Sequence[EvalResult], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Write a PNG of accuracy (%) against n_way; returns its path."""
    if not results:
        raise ValueError("no results to plot")
    # The object-oriented API, not pyplot: no global figure state, no GUI backend to pick.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for shot in sorted({r.shot for r in results}):
        points = sorted((r for r in results if r.shot == shot), key=lambda r: r.way)
        ax.errorbar(
            [r.way for r in points], [100 * r.accuracy for r in points],
            yerr=[100 * (r.ci95 or 0.0) for r in points],
            marker="o", capsize=4, label=f"{shot}-shot",
        )
    ways = sorted({r.way for r in results})
    ax.set_xscale("log")
    ax.set_xticks(ways, [str(w) for w in ways])
    ax.minorticks_off()
    ax.set_xlabel("n_way (classes per episode)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(top=100)
    ax.grid(True, alpha=0.3)
    ax.legend(title="n_shot")
    episodes = sorted({r.episodes for r in results})
    queries = sorted({r.queries_per_class for r in results})
    fig.suptitle(title or "MetaNet on held-out alphabets")
    ax.set_title(f"{'/'.join(map(str, episodes))} episodes a point, {'/'.join(map(str, queries))} "
                 "queries a class; error bars: 95% CI", fontsize=9, color="0.35")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    return out
