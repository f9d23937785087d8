"""Personalised sparse models: pFedGate's block partition, knapsack selection, gating layer
and gated training (Chen et al., ICML 2023)."""

from fedsparse.personal.blocks import Block, BlockPartition
from fedsparse.personal.knapsack import SOLVERS, Solver, exact, greedy
from fedsparse.personal.pfedgate import (
    BudgetRule,
    GatedLearner,
    GatedModel,
    GatingLayer,
    RoundStats,
    block_scale,
    min_gate,
    select_blocks,
)

__all__ = [
    "SOLVERS",
    "Block",
    "BlockPartition",
    "BudgetRule",
    "GatedLearner",
    "GatedModel",
    "GatingLayer",
    "RoundStats",
    "Solver",
    "block_scale",
    "exact",
    "greedy",
    "min_gate",
    "select_blocks",
]
