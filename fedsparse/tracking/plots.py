"""Accuracy plots: vs round and vs cumulative uplink, for one run or several overlaid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

from fedsparse.tracking.history import Row, series

MB = 1e6

# (file name, x column, x label, x scale)
PLOTS = (
    ("accuracy_vs_round.png", "round", "round", 1.0),
    ("accuracy_vs_uplink.png", "cum_uplink_bytes", "cumulative uplink (MB)", MB),
)


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend, imported when a plot is drawn: at module level
    it cost every process that registers the strategies (each Ray actor, the CLI) about
    0.5 s of CPU for plots only the ServerApp and ``compare`` draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread(runs: Mapping[str, Sequence[Row]], x_key: str) -> float:
    """Ratio of the largest to the smallest final value of ``x_key`` across runs."""
    finals = [float(rows[-1][x_key]) for rows in runs.values() if rows and x_key in rows[-1]]
    positive = [v for v in finals if v > 0]
    return max(positive) / min(positive) if positive else 1.0


def accuracy_plots(runs: Mapping[str, Sequence[Row]], out_dir: Path,
                   metric: str = "accuracy") -> list[Path]:
    """One figure per x axis of :data:`PLOTS`, one line per run; returns the files written."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, x_key, x_label, scale in PLOTS:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for label, rows in runs.items():
            xs, ys = series(rows, x_key, metric)
            ax.plot([x / scale for x in xs], ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"centralised test {metric}")
        if x_key != "round" and _spread(runs, x_key) > 20:
            ax.set_xscale("log")  # runs that differ by orders of magnitude in bytes
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
        written.append(out_dir / filename)
    return written
