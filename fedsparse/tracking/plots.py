"""Plots of a run's rounds, for one run or several overlaid: centralised test accuracy vs round
and vs cumulative uplink (with the ``--target`` accuracy as a line), centralised test loss vs
round, and federated evaluation accuracy vs round where the runs evaluated on clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fedsparse.tracking.history import Row, series

MB = 1e6


@dataclass(frozen=True)
class Panel:
    file: str
    x: str  # metrics.csv column on the x axis
    y: str  # ... and on the y axis
    x_label: str
    y_label: str
    x_scale: float = 1.0
    target: bool = False  # draw the target accuracy


PANELS = (
    Panel("accuracy_vs_round.png", "round", "accuracy", "round", "centralised test accuracy",
          target=True),
    Panel("accuracy_vs_uplink.png", "cum_uplink_bytes", "accuracy", "cumulative uplink (MB)",
          "centralised test accuracy", MB, target=True),
    Panel("loss_vs_round.png", "round", "loss", "round", "centralised test loss"),
    Panel("fed_accuracy_vs_round.png", "round", "fed_accuracy_weighted", "round",
          "federated accuracy (weighted by examples)", target=True),
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


def round_plots(runs: Mapping[str, Sequence[Row]], out_dir: Path,
                target: float | None = None) -> list[Path]:
    """One figure per panel of :data:`PANELS` that some run has values for, one line per run
    (labelled with its key of ``runs``); returns the files written."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in PANELS:
        lines = {label: series(rows, panel.x, panel.y) for label, rows in runs.items()}
        if not any(ys for _, ys in lines.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for label, (xs, ys) in lines.items():
            ax.plot([x / panel.x_scale for x in xs], ys, marker="o", markersize=3, label=label)
        if panel.target and target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1,
                       label=f"target {target:g}")
        ax.set_xlabel(panel.x_label)
        ax.set_ylabel(panel.y_label)
        if panel.x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif _spread(runs, panel.x) > 20:
            ax.set_xscale("log")  # runs that differ by orders of magnitude in bytes
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / panel.file)
        plt.close(fig)
        written.append(out_dir / panel.file)
    return written
