"""What the terminal shows of a finished run: a short aligned table (or one line with
``--quiet``), the run folder and the command that opens its MLflow run. The whole summary
stays machine-readable in ``summary.json`` and ``--summary FILE``. And the tables of
``fedsparse ls`` (one row per run) and ``fedsparse show`` (one row per round)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsparse.tracking.runs import RunView, status_line

SQLITE = "sqlite:///"
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3's UI shows an experiment in its GenAI view (traces) by default, whatever the
# experiment's `mlflow.experimentKind` tag says; this query parameter opens model training.
TRAINING_VIEW = "?workflowType=machine_learning"


def run_page(base: str, experiment_id: str, run_id: str) -> str:
    """The address of an MLflow run's page in MLflow's model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW}"


def mlflow_hint(tracking_uri: str, run_id: str, experiment_id: str = "") -> str:
    """Where the run's MLflow run is, as a command to open it and its page, where there is
    one."""
    if not run_id:
        return "not tracked"
    if tracking_uri.startswith(SQLITE):
        store = Path(tracking_uri.removeprefix(SQLITE))
        here = Path.cwd().resolve()
        shown = store.relative_to(here) if store.is_relative_to(here) else store
        page = f", then {run_page(UI, experiment_id, run_id)}" if experiment_id else ""
        return (f"run {run_id}: mlflow ui --backend-store-uri "
                f"{shlex.quote(SQLITE + str(shown))}{page}")
    if tracking_uri.startswith(("http://", "https://")) and experiment_id:
        return run_page(tracking_uri, experiment_id, run_id)
    if tracking_uri:
        return f"run {run_id} at {tracking_uri}"
    return f"run {run_id} in the ServerApp's MLflow (its MLFLOW_TRACKING_URI)"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def table(name: str, summary: dict[str, Any], tracking_uri: str) -> str:
    """The final metrics of a run, one aligned row each."""
    rows: list[tuple[str, str]] = []
    if "final_accuracy" in summary:
        rows.append(("accuracy", f"{summary['final_accuracy']:.4f} (centralised test set), "
                                 f"loss {summary['final_loss']:.4f}"))
    if "fed_accuracy_weighted" in summary:
        rows.append(("federated accuracy",
                     f"{summary['fed_accuracy_weighted']:.4f} weighted, "
                     f"{summary['fed_accuracy_mean']:.4f} mean, "
                     f"{summary['fed_accuracy_bottom10']:.4f} bottom 10%"))
    rows.append(("uplink / downlink", f"{_mb(summary['uplink_bytes'])} / "
                                      f"{_mb(summary['downlink_bytes'])}"))
    rows.append(("training", f"{summary['train_flops'] / 1e9:.1f} GFLOPs"))
    dropped = summary["replies_dropped"]
    rows.append(("replies dropped", f"{dropped} (clients.csv says why)" if dropped else "0"))
    rows.append(("time", f"{summary['total_wall_s']:.1f} s, of which rounds "
                         f"{summary['rounds_s']:.1f} s"))
    rows.append(("run folder", str(summary["run_dir"])))
    rows.append(("MLflow", mlflow_hint(tracking_uri, summary.get("mlflow_run_id", ""),
                                       summary.get("mlflow_experiment_id", ""))))
    if summary.get("failure"):
        rows.append(("FAILED", summary["failure"]))
    width = max(len(label) for label, _ in rows)
    head = f"{name}: {summary['rounds']} rounds"
    return "\n".join([head, *(f"  {label:<{width}}  {value}" for label, value in rows)])


def one_line(name: str, summary: dict[str, Any]) -> str:
    """The run in one line (``--quiet``)."""
    accuracy = (f", accuracy {summary['final_accuracy']:.4f}"
                if "final_accuracy" in summary else "")
    failed = f", FAILED: {summary['failure']}" if summary.get("failure") else ""
    return (f"{name}: {summary['rounds']} rounds{accuracy}, uplink "
            f"{_mb(summary['uplink_bytes'])}, {summary['total_wall_s']:.1f} s -> "
            f"{summary['run_dir']}{failed}")


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w)
                         for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).replace("/", "", 1).isdigit()


def _acc(summary: dict[str, Any]) -> str:
    return f"{summary['final_accuracy']:.4f}" if "final_accuracy" in summary else "-"


def runs_table(views: Sequence[RunView], labels: Sequence[str]) -> str:
    """``fedsparse ls``: one row per run."""
    rows = [[label, status_line(view), f"{view.rounds}/{view.planned_rounds}", _acc(view.summary),
             f"{view.summary['uplink_bytes'] / 1e6:.1f}" if "uplink_bytes" in view.summary
             else "-", view.where] for view, label in zip(views, labels, strict=True)]
    return aligned(["run", "status", "rounds", "accuracy", "uplink MB", "where"], rows)


# (metrics.csv column, title, format) of ``fedsparse show``'s per-round table
ROUND_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "accuracy", "{:.4f}"), ("loss", "loss", "{:.4f}"),
    ("fed_accuracy_weighted", "fed. accuracy", "{:.4f}"),
    ("train_loss", "train loss", "{:.4f}"), ("clients_ok", "clients ok", "{:.0f}"),
    ("uplink_bytes", "uplink MB", "{:.2f}"), ("cum_uplink_bytes", "cum. uplink MB", "{:.2f}"),
    ("round_s", "round s", "{:.2f}"),
)


def rounds_table(history: Sequence[dict[str, Any]]) -> str:
    """``fedsparse show``: one row per round, the columns the run has."""
    columns = [c for c in ROUND_COLUMNS if any(c[0] in row for row in history)]
    scale = {"uplink_bytes": 1e6, "cum_uplink_bytes": 1e6}
    rows = [[str(int(row["round"])), *(fmt.format(row[key] / scale.get(key, 1))
                                       if key in row else "-" for key, _, fmt in columns)]
            for row in history]
    return aligned(["round", *(title for _, title, _ in columns)], rows)
