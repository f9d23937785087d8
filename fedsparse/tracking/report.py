"""Comparison report of several runs: a table of final metrics and overlaid accuracy plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsparse.tracking.history import Row, write_csv
from fedsparse.tracking.plots import MB, accuracy_plots

# (summary key, column title, formatter)
COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("final_accuracy", "final accuracy", lambda v: f"{v:.4f}"),
    ("fed_accuracy_weighted", "fed. accuracy (weighted)", lambda v: f"{v:.4f}"),
    ("rounds", "rounds", lambda v: f"{int(v)}"),
    ("uplink_bytes", "uplink MB", lambda v: f"{v / MB:.2f}"),
    ("downlink_bytes", "downlink MB", lambda v: f"{v / MB:.2f}"),
    ("train_flops", "train GFLOPs", lambda v: f"{v / 1e9:.2f}"),
    ("wall_s", "wall s", lambda v: f"{v:.1f}"),
    ("mlflow_run_id", "MLflow run", str),
)


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    header = ["run", *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, summary in summaries.items():
        cells = [label] + [fmt(summary[key]) if key in summary else "-"
                           for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(summaries: Mapping[str, Mapping[str, Any]],
                 histories: Mapping[str, Sequence[Row]], out_dir: Path,
                 title: str) -> list[Path]:
    """Write ``report.md``, ``summary.csv`` and the overlay plots; return the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = accuracy_plots(histories, out_dir / "plots")
    table = write_csv([{"run": label, **summary} for label, summary in summaries.items()],
                      out_dir / "summary.csv")
    body = [f"# {title}\n", markdown_table(summaries)]
    body += [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    report = out_dir / "report.md"
    report.write_text("\n".join(body))
    return [report, table, *plots]
