"""Continual-learning metrics over an accuracy matrix.

``R[t, j]`` is the accuracy on task ``j``'s test data after training on task ``t``
(Lopez-Paz & Ranzato 2017, GEM, Section 5; Chaudhry et al. 2018 for forgetting):

- average accuracy after task ``t``: ``mean_j<=t R[t, j]``;
- forgetting of task ``j`` after ``T`` tasks: ``max_{j<=l<T} R[l, j] - R[T, j]``, averaged over
  ``j < T`` (Chaudhry et al. 2018, eq. 2);
- backward transfer: ``mean_{j<T} R[T, j] - R[j, j]`` (GEM, eq. for BWT).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fedsparse.continual.streams import TaskStream


def average_accuracy(matrix: np.ndarray, after: int) -> float:
    return float(np.mean(matrix[after, :after + 1]))


def forgetting(matrix: np.ndarray, after: int) -> float:
    """Mean over old tasks of (best earlier accuracy - accuracy now); 0 after the first."""
    if after == 0:
        return 0.0
    return float(np.mean([matrix[j:after, j].max() - matrix[after, j] for j in range(after)]))


def backward_transfer(matrix: np.ndarray, after: int) -> float:
    if after == 0:
        return 0.0
    return float(np.mean([matrix[after, j] - matrix[j, j] for j in range(after)]))


def empty_matrix(num_tasks: int) -> np.ndarray:
    """A T x T matrix of NaN: rows are filled as tasks end."""
    return np.full((num_tasks, num_tasks), math.nan)


@torch.no_grad()
def task_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, stream: TaskStream,
                    task_il: bool, batch_size: int = 2048) -> list[float]:
    """Accuracy on every task's test examples: class-IL (argmax over all logits) or task-IL
    (argmax over the task's own logits). NaN for a task without test examples."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) \
        if len(x) else torch.empty(0, 0)
    accuracies = []
    for task in range(len(stream)):
        idx = stream.select(y, task)
        if len(idx) == 0:
            accuracies.append(math.nan)
            continue
        scores = logits[idx]
        if task_il:
            scores = scores.masked_fill(~stream.logit_mask(task, scores.shape[1]), -math.inf)
        accuracies.append(float((scores.argmax(dim=1) == y[idx]).float().mean()))
    return accuracies
