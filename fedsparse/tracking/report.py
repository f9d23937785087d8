"""Comparison report of several runs: a table of final metrics, a table of the scenario keys
that differ between them, and overlaid plots of their rounds."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsparse.tracking.history import Row, write_csv
from fedsparse.tracking.plots import MB, round_plots

# (summary key, column title, formatter)
COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("final_accuracy", "final accuracy", lambda v: f"{v:.4f}"),
    ("average_accuracy", "avg class-IL acc", lambda v: f"{v:.4f}"),
    ("forgetting", "forgetting", lambda v: f"{v:.4f}"),
    ("task_il_average_accuracy", "avg task-IL acc", lambda v: f"{v:.4f}"),
    ("fed_accuracy_weighted", "fed. accuracy (weighted)", lambda v: f"{v:.4f}"),
    ("fed_accuracy_mean", "fed. accuracy (mean)", lambda v: f"{v:.4f}"),
    ("fed_accuracy_bottom10", "fed. accuracy (bottom 10%)", lambda v: f"{v:.4f}"),
    ("novel_accuracy_mean", "novel clients (mean)", lambda v: f"{v:.4f}"),
    ("budget_mean", "budget s", lambda v: f"{v:.2f}"),
    ("eval_density_mean", "density used", lambda v: f"{v:.3f}"),
    ("rounds", "rounds", lambda v: f"{int(v)}"),
    ("replies_dropped", "replies dropped", lambda v: f"{int(v)}"),
    ("rounds_to_target", "rounds to target", lambda v: f"{int(v)}"),
    ("uplink_bytes", "uplink MB", lambda v: f"{v / MB:.2f}"),
    ("uplink_reduction", "uplink reduction x", lambda v: f"{v:.1f}"),
    ("downlink_bytes", "downlink MB", lambda v: f"{v / MB:.2f}"),
    ("downlink_reduction", "downlink reduction x", lambda v: f"{v:.1f}"),
    ("ranks_alive", "ranks alive", lambda v: f"{int(v)}"),
    ("train_flops", "train GFLOPs", lambda v: f"{v / 1e9:.2f}"),
    ("train_dense_flops", "dense-equiv. GFLOPs", lambda v: f"{v / 1e9:.2f}"),
    ("flops_reduction", "FLOPs reduction x", lambda v: f"{v:.1f}"),
    ("wall_s", "wall s", lambda v: f"{v:.1f}"),
    ("mlflow_run_id", "MLflow run", str),
)


def rounds_to(history: Sequence[Row], target: float) -> int | None:
    """The first evaluated round whose centralised accuracy reaches ``target``."""
    return next((int(r["round"]) for r in history if r.get("accuracy", -1) >= target), None)


def with_comparisons(summaries: Mapping[str, Mapping[str, Any]],
                     histories: Mapping[str, Sequence[Row]], target: float | None,
                     reference: str) -> dict[str, dict[str, Any]]:
    """Summaries plus ``rounds_to_target`` and ``uplink_reduction`` (reference / run)."""
    out = {label: dict(summary) for label, summary in summaries.items()}
    for label, summary in out.items():
        if target is not None:
            reached = rounds_to(histories.get(label, []), target)
            if reached is not None:
                summary["rounds_to_target"] = reached
        for key, ratio in (("uplink_bytes", "uplink_reduction"),
                           ("downlink_bytes", "downlink_reduction"),
                           ("train_flops", "flops_reduction")):
            if reference and summary.get(key) and summaries[reference].get(key):
                summary[ratio] = summaries[reference][key] / summary[key]
    return out


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    columns = [c for c in COLUMNS if any(c[0] in s for s in summaries.values())]
    header = ["run", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, summary in summaries.items():
        cells = [label] + [fmt(summary[key]) if key in summary else "-"
                           for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def params_table(params: Mapping[str, Mapping[str, str]]) -> str:
    """One row per run, one column per scenario key that differs between the runs."""
    keys = list(dict.fromkeys(k for values in params.values() for k in values))
    lines = ["| run | " + " | ".join(f"`{k}`" for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    lines += ["| " + " | ".join([label, *(values.get(k, "-") for k in keys)]) + " |"
              for label, values in params.items()]
    return "\n".join(lines) + "\n"


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def write_report(summaries: Mapping[str, Mapping[str, Any]],
                 histories: Mapping[str, Sequence[Row]], out_dir: Path, title: str,
                 target: float | None = None, reference: str = "",
                 params: Mapping[str, Mapping[str, str]] | None = None) -> list[Path]:
    """Write ``report.md``, ``summary.csv``, each run's ``metrics/<run>.csv`` and the overlay
    plots (the ``target`` accuracy drawn on them); return the files. ``params``: per run, the
    scenario keys that differ between the runs and their values (``tracking/runs.py``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table_rows = with_comparisons(summaries, histories, target, reference)
    plots = round_plots(histories, out_dir / "plots", target)
    table = write_csv([{"run": label, **summary} for label, summary in table_rows.items()],
                      out_dir / "summary.csv")
    per_run = [write_csv(rows, out_dir / "metrics" / f"{_file_name(label)}.csv")
               for label, rows in histories.items()]
    notes = []
    if target is not None:
        notes.append(f"rounds to target: first evaluated round with accuracy >= {target}")
    if reference:
        notes.append(f"uplink (downlink, FLOPs) reduction: uplink bytes (downlink bytes, "
                     f"training FLOPs) of {reference} / those of the run")
    body = [f"# {title}\n", markdown_table(table_rows)]
    if params and any(params.values()):
        body += ["What differs between the runs (the scenario keys whose values differ):\n",
                 params_table(params)]
    body += [f"- {n}" for n in notes] + ([""] if notes else [])
    body += [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    report = out_dir / "report.md"
    report.write_text("\n".join(body))
    return [report, table, *per_run, *plots]
