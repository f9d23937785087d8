"""0-1 knapsack over blocks: pick blocks of maximal total importance whose sizes fit a
capacity (pFedGate, Chen et al. ICML 2023, Section 4.2, eq. 4; ALGORITHMS.md §2.3 step 2).

Importance values are small non-negative integers (pFedGate: ``round(10 * gate)``, 0..10),
sizes are block sizes in parameters (up to millions), so:

- :func:`greedy`, the release's default: blocks in descending value (ties: lower index
  first), each taken if it still fits, otherwise skipped (later, smaller blocks may fit);
- :func:`exact`: dynamic programming over the total *value* (at most ``10 * L`` for ``L``
  blocks), keeping the minimal size that reaches each value, so it stays cheap whatever the
  sizes; among the optimal selections it returns one of minimal size.

Both return a boolean selection and never exceed the capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

Solver = Literal["greedy", "exact"]


def greedy(values: np.ndarray, sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Take blocks in descending value while they fit."""
    chosen = np.zeros(len(values), bool)
    used = 0
    for i in np.argsort(-np.asarray(values), kind="stable"):
        if used + sizes[i] <= capacity:
            chosen[i] = True
            used += int(sizes[i])
    return chosen


def exact(values: np.ndarray, sizes: np.ndarray, capacity: int) -> np.ndarray:
    """An optimal 0-1 selection: ``lightest[v]`` is the least total size reaching value ``v``."""
    values = np.asarray(values, np.int64)
    capacity = max(0, capacity)
    if (values < 0).any():
        raise ValueError("knapsack values must be non-negative integers")
    n, top = len(values), int(values.sum())
    lightest = np.full(top + 1, np.iinfo(np.int64).max // 2, np.int64)
    lightest[0] = 0
    took = np.zeros((n, top + 1), bool)
    for i in range(n):
        v, w = int(values[i]), int(sizes[i])
        candidate = lightest.copy()
        candidate[v:] = lightest[:top + 1 - v] + w
        better = candidate < lightest
        took[i] = better
        lightest = np.where(better, candidate, lightest)
    best = int(np.flatnonzero(lightest <= capacity).max())
    chosen = np.zeros(n, bool)
    for i in range(n - 1, -1, -1):  # walk the decisions back
        if took[i, best]:
            chosen[i] = True
            best -= int(values[i])
    return chosen


SOLVERS: dict[Solver, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "greedy": greedy, "exact": exact}
