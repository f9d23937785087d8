"""Sparse masks and their dynamics: ERK/uniform initial masks, magnitude pruning, regrowth
by random/gradient/momentum criteria, per-task isolation."""

from fedsparse.sparse.dst import Growth, cosine_rate, drop_and_grow, grow, keep_top
from fedsparse.sparse.isolation import TaskIsolation
from fedsparse.sparse.masks import (
    Mask,
    erk_densities,
    keep_count,
    sparse_parameters,
    top_positions,
    uniform_densities,
)

__all__ = [
    "Growth",
    "Mask",
    "TaskIsolation",
    "cosine_rate",
    "drop_and_grow",
    "erk_densities",
    "grow",
    "keep_count",
    "keep_top",
    "sparse_parameters",
    "top_positions",
    "uniform_densities",
]
