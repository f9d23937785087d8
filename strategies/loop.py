"""The server's round loop: the same steps as ``Strategy.start`` plus what a platform needs.

Per round: ``configure_train -> grid.send_and_receive -> aggregate_train``, then every
``eval_every`` rounds centralised evaluation on the held-out test set and federated
evaluation on the clients' local test splits. Around those steps: following the nodes that
serve the partitions (``strategies/directory.py``), per-round accounting and cumulative
counters, a progress event and MLflow metrics per round, and a checkpoint after every
finished round so that a run can resume where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsparse.checkpoint import Checkpoint
from fedsparse.scenario import Scenario
from fedsparse.tracking import events
from fedsparse.tracking.continual import task_end_metrics
from fedsparse.tracking.history import Row
from strategies.base import FedSparseStrategy
from strategies.exchange import exchange
from strategies.records import from_numpy, to_numpy

log = logging.getLogger("fedsparse.loop")

MODEL_PREFIX, STRATEGY_PREFIX = "model/", "strategy/"
CUMULATIVE = {"uplink_bytes": "cum_uplink_bytes", "downlink_bytes": "cum_downlink_bytes",
              "train_flops": "cum_train_flops"}
# cumulated only in runs whose clients report them (sparse training)
CUMULATIVE_IF_REPORTED = {"train_dense_flops": "cum_train_dense_flops"}

Evaluator = Callable[[int, ArrayRecord], dict[str, float]]  # (round, global model) -> metrics
RoundHook = Callable[[int, Row], None]


@dataclass
class LoopState:
    """What survives a round: the global model, the history, the cumulative counters."""

    arrays: ArrayRecord
    next_round: int = 1
    history: list[Row] = field(default_factory=list)

    def totals(self) -> dict[str, float]:
        return {cum: self.history[-1].get(cum, 0) if self.history else 0
                for cum in (CUMULATIVE | CUMULATIVE_IF_REPORTED).values()}

    def checkpoint(self, strategy: FedSparseStrategy, extra: dict[str, Any]) -> Checkpoint:
        arrays = {MODEL_PREFIX + k: v for k, v in to_numpy(self.arrays).items()}
        arrays |= {STRATEGY_PREFIX + k: v for k, v in strategy.state_arrays().items()}
        return Checkpoint(round=self.next_round - 1, arrays=arrays,
                          state={"history": self.history, **extra})

    @classmethod
    def restore(cls, ckpt: Checkpoint, strategy: FedSparseStrategy) -> LoopState:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in ckpt.arrays.items() if k.startswith(prefix)}

        strategy.load_state_arrays(part(STRATEGY_PREFIX))
        return cls(arrays=from_numpy(part(MODEL_PREFIX)), next_round=ckpt.round + 1,
                   history=list(ckpt.state["history"]))


def run_rounds(grid: Grid, scenario: Scenario, strategy: FedSparseStrategy, state: LoopState,
               evaluate_central: Evaluator, on_round: RoundHook) -> LoopState:
    """Rounds ``state.next_round .. run.rounds`` with a bound strategy
    (``strategies/directory.py``); ``on_round`` runs after each (track, checkpoint)."""
    run = scenario.run
    for server_round in range(state.next_round, run.rounds + 1):
        start = time.perf_counter()
        row: Row = {"round": server_round}
        strategy.begin_round(server_round, grid)
        replies = exchange(
            grid, strategy.configure_train(server_round, state.arrays, ConfigRecord(), grid),
            run.round_timeout_s)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            state.arrays = new_arrays
        row |= dict(train_metrics)
        row |= strategy.after_round(server_round, state.arrays, grid)
        if scenario.evaluates(server_round):
            row |= evaluate_central(server_round, state.arrays)
            replies = exchange(
                grid, strategy.configure_evaluate(server_round, state.arrays, ConfigRecord(),
                                                  grid), run.round_timeout_s)
            row |= dict(strategy.aggregate_evaluate(server_round, replies))
        totals = state.totals()
        for key, cum in CUMULATIVE.items():
            row[cum] = totals[cum] + row.get(key, 0)
        for key, cum in CUMULATIVE_IF_REPORTED.items():
            if key in row:
                row[cum] = totals[cum] + row[key]
        row["round_s"] = time.perf_counter() - start
        state.history.append(row)
        if scenario.continual is not None and scenario.continual.task_ends(server_round):
            row |= task_end_metrics(state.history, scenario)
        state.next_round = server_round + 1
        on_round(server_round, row)
        events.emit("round", round=server_round, rounds=run.rounds, metrics=row)
    return state

