"""The machine-readable result of a run: a flat JSON object of final metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedsparse.tracking.history import Row

# Last value of these round metrics (from the last round that evaluated) -> summary key.
FINAL_EVAL = {
    "accuracy": "final_accuracy",
    "loss": "final_loss",
    "fed_accuracy_mean": "fed_accuracy_mean",
    "fed_accuracy_weighted": "fed_accuracy_weighted",
    "fed_accuracy_bottom10": "fed_accuracy_bottom10",
    "novel_accuracy_mean": "novel_accuracy_mean",
    "novel_accuracy_bottom10": "novel_accuracy_bottom10",
    "density_mean": "density_mean",
    "eval_density_mean": "eval_density_mean",
    "budget_mean": "budget_mean",
    "ranks_alive": "ranks_alive",
}
FINAL_TOTALS = {
    "cum_uplink_bytes": "uplink_bytes",
    "cum_downlink_bytes": "downlink_bytes",
    "cum_train_flops": "train_flops",
}
# ... and these when the run's clients report them (sparse training).
FINAL_TOTALS_IF_REPORTED = {"cum_train_dense_flops": "train_dense_flops"}
DROPPED = ("clients_failed", "clients_rejected", "eval_clients_failed", "eval_clients_rejected")
SUMMED = (*DROPPED, "eval_uplink_bytes", "eval_downlink_bytes")


def summarize(history: Sequence[Row], wall_s: float, mlflow_run_id: str) -> dict[str, Any]:
    """Final centralised accuracy (0-1), cumulative bytes and FLOPs, rounds, wall time, run id."""
    if not history:
        raise ValueError("no finished round to summarize")
    last = history[-1]
    summary: dict[str, Any] = {"rounds": int(last["round"])}
    for row in history:
        summary |= {out: row[key] for key, out in FINAL_EVAL.items() if key in row}
    summary |= {out: last[key] for key, out in FINAL_TOTALS.items()}
    summary |= {out: last[key] for key, out in FINAL_TOTALS_IF_REPORTED.items() if key in last}
    summary |= {key: sum(row.get(key, 0) for row in history) for key in SUMMED}
    summary["replies_dropped"] = sum(summary[key] for key in DROPPED)  # clients.csv says why
    summary["rounds_failed"] = sum(row.get("round_counted", 1) == 0 for row in history)
    summary["rounds_s"] = sum(row["round_s"] for row in history)
    summary["wall_s"] = wall_s
    summary["mlflow_run_id"] = mlflow_run_id
    return summary
