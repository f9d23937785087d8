"""Task streams: a dataset cut into tasks of disjoint classes (Split-MNIST style).

Split-MNIST is 5 tasks x 2 classes (van de Ven & Tolias 2019; Mammoth's seq-mnist). The
class order is fixed by a seed: the natural order ``0, 1, ..., 9`` unless shuffled, and in a
federation each client may draw its own order. Class-incremental evaluation (class-IL)
takes the argmax over all classes; task-incremental (task-IL) only over the classes of the
example's task (the task identity is given at test time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def class_order(num_classes: int, seed: int | None) -> tuple[int, ...]:
    """``0..num_classes-1`` in natural order (``seed=None``) or a seeded permutation."""
    if seed is None:
        return tuple(range(num_classes))
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return tuple(int(c) for c in perm)


@dataclass(frozen=True)
class TaskStream:
    """``tasks[t]`` is the tuple of classes of task ``t``."""

    tasks: tuple[tuple[int, ...], ...]

    @classmethod
    def split(cls, order: Sequence[int], classes_per_task: int, num_tasks: int) -> TaskStream:
        if classes_per_task * num_tasks > len(order):
            raise ValueError(f"{num_tasks} tasks x {classes_per_task} classes need "
                             f"{classes_per_task * num_tasks} classes; the dataset has "
                             f"{len(order)}")
        return cls(tuple(tuple(order[t * classes_per_task:(t + 1) * classes_per_task])
                         for t in range(num_tasks)))

    def __len__(self) -> int:
        return len(self.tasks)

    def seen_classes(self, task: int) -> tuple[int, ...]:
        """Classes of tasks ``0..task``."""
        return tuple(c for t in self.tasks[:task + 1] for c in t)

    def select(self, labels: torch.Tensor, task: int) -> torch.Tensor:
        """Indices of the examples of task ``task``."""
        return torch.nonzero(torch.isin(labels, torch.tensor(self.tasks[task]))).flatten()

    def logit_mask(self, task: int, num_classes: int) -> torch.Tensor:
        """True on the logits of task ``task``'s classes."""
        keep = torch.zeros(num_classes, dtype=torch.bool)
        keep[list(self.tasks[task])] = True
        return keep
