"""What the terminal shows of a finished run: a short aligned table (or one line with
``--quiet``), the run folder and the command that opens its MLflow run. The whole summary
stays machine-readable in ``summary.json`` and ``--summary FILE``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

SQLITE = "sqlite:///"


def mlflow_hint(tracking_uri: str, run_id: str) -> str:
    """Where the run's MLflow run is, as a command to open it where there is one."""
    if not run_id:
        return "not tracked"
    if tracking_uri.startswith(SQLITE):
        store = Path(tracking_uri.removeprefix(SQLITE))
        here = Path.cwd().resolve()
        shown = store.relative_to(here) if store.is_relative_to(here) else store
        return (f"run {run_id}: mlflow ui --backend-store-uri "
                f"{shlex.quote(SQLITE + str(shown))}")
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
    rows.append(("MLflow", mlflow_hint(tracking_uri, summary.get("mlflow_run_id", ""))))
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
