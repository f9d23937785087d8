"""Tracking of continual runs: per-task accuracies each evaluation, the accuracy matrix, CL
metrics at task ends, and the matrix as a CSV and a heat map.

The server evaluates the global model on the held-out test set split by the *reference*
task stream (the scenario's class order; the natural order when every client draws its
own). Row ``t`` of the accuracy matrix is the evaluation at the last round of task ``t``;
it is rebuilt from the run's history, so a resumed run has it too.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsparse.continual import (
    TaskStream,
    average_accuracy,
    backward_transfer,
    class_order,
    empty_matrix,
    forgetting,
    task_accuracies,
)
from fedsparse.protocol import derive_seed
from fedsparse.scenario import Scenario
from fedsparse.tracking.history import Row
from fedsparse.tracking.plots import pyplot

SETTINGS = {"class_il": "task{}_accuracy", "task_il": "task{}_til_accuracy"}


def reference_stream(scenario: Scenario, num_classes: int) -> TaskStream:
    spec = scenario.continual
    assert spec is not None
    seed = derive_seed(scenario.seed, "class-order") if spec.class_order == "seeded" else None
    return TaskStream.split(class_order(num_classes, seed), spec.classes_per_task,
                            spec.num_tasks)


@torch.no_grad()
def evaluate_tasks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, stream: TaskStream,
                   task: int, views: dict[int, dict[str, torch.Tensor]] | None = None
                   ) -> dict[str, float]:
    """After training task ``task``: accuracy and loss on the seen tasks' test examples
    (class-IL), task-IL accuracy on them, and every seen task's accuracy in both settings.

    With ``views`` (per-task parameter isolation) task ``j`` is evaluated with its own
    weights ``views[j]``: the task identity picks the subnetwork, as Yildirim et al. evaluate.
    """
    out: dict[str, float] = {}
    losses = []
    for j in range(task + 1):
        if views is not None:
            model.load_state_dict(views[j])
        for setting, key in SETTINGS.items():
            out[key.format(j)] = task_accuracies(model, x, y, stream,
                                                 task_il=setting == "task_il")[j]
        idx = stream.select(y, j)
        losses.append(float(F.cross_entropy(model(x[idx]), y[idx])) if len(idx) else 0.0)
    sizes = [len(stream.select(y, j)) for j in range(task + 1)]
    for setting, key in SETTINGS.items():
        name = "accuracy" if setting == "class_il" else "task_il_accuracy"
        out[name] = float(np.average([out[key.format(j)] for j in range(task + 1)],
                                     weights=sizes))
    out["loss"] = float(np.average(losses, weights=sizes))
    return out


def accuracy_matrix(history: Sequence[Row], scenario: Scenario,
                    setting: str = "class_il") -> np.ndarray:
    """``R[t, j]``: accuracy on task j after task t (NaN where not reached yet)."""
    spec = scenario.continual
    assert spec is not None
    matrix = empty_matrix(spec.num_tasks)
    for row in history:
        if spec.task_ends(int(row["round"])):
            t = spec.task_of(int(row["round"]))
            for j in range(t + 1):
                matrix[t, j] = row.get(SETTINGS[setting].format(j), np.nan)
    return matrix


def task_end_metrics(history: Sequence[Row], scenario: Scenario) -> dict[str, float]:
    """Average accuracy, forgetting and backward transfer after the last finished task."""
    spec = scenario.continual
    assert spec is not None
    finished = [int(r["round"]) for r in history if spec.task_ends(int(r["round"]))]
    if not finished:
        return {}
    t = spec.task_of(finished[-1])
    out = {}
    for setting in SETTINGS:
        matrix = accuracy_matrix(history, scenario, setting)
        prefix = "" if setting == "class_il" else "task_il_"
        out |= {f"{prefix}average_accuracy": average_accuracy(matrix, t),
                f"{prefix}forgetting": forgetting(matrix, t),
                f"{prefix}backward_transfer": backward_transfer(matrix, t)}
    return out


def matrix_artifacts(history: Sequence[Row], scenario: Scenario, out_dir: Path) -> list[Path]:
    """``accuracy_matrix_<setting>.csv`` and a heat map ``.png`` per setting."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for setting in SETTINGS:
        matrix = accuracy_matrix(history, scenario, setting)
        csv_path = out_dir / f"accuracy_matrix_{setting}.csv"
        with open(csv_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["after_task", *[f"task{j}" for j in range(len(matrix))]])
            writer.writerows([[t, *row] for t, row in enumerate(matrix)])
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(matrix), 0.8 + 0.7 * len(matrix)),
                               dpi=120)
        ax.imshow(np.nan_to_num(matrix, nan=0.0), vmin=0.0, vmax=1.0, cmap="viridis")
        for t, row in enumerate(matrix):
            for j, value in enumerate(row):
                if not np.isnan(value):
                    ax.text(j, t, f"{value:.2f}", ha="center", va="center",
                            color="white" if value < 0.6 else "black", fontsize=8)
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after training task")
        ax.set_title(f"{scenario.name}: {setting.replace('_', '-')} accuracy", fontsize=9)
        fig.tight_layout()
        png_path = out_dir / f"accuracy_matrix_{setting}.png"
        fig.savefig(png_path)
        plt.close(fig)
        written += [csv_path, png_path]
    return written
