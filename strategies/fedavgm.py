"""FedAvgM: federated averaging with server momentum (Hsu, Qi & Brown 2019, "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification",
arXiv:1909.06335, section 3).

The clients run plain local SGD (``clients/programs/sgd.py``), as for FedAvg. The server
takes the sample-weighted mean of their models, treats its distance from the global model
as a pseudo-gradient and steps with momentum:

    Delta_t = w_t - sum_k (n_k / n) w^k_{t+1}
    v_t     = beta v_{t-1} + Delta_t            (v_0 = 0)
    w_{t+1} = w_t - eta v_t

With beta = 0 and eta = 1 this is FedAvg. The momentum buffer v is server state, so it is
saved in every checkpoint and a resumed run goes on with it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from flwr.app import ArrayRecord
from pydantic import Field

from fedsparse.protocol import ARRAYS
from fedsparse.registry import STRATEGIES, StrategyParams
from fedsparse.scenario import Scenario
from strategies.base import FedSparseStrategy, Reply
from strategies.fedavg import sample_weighted_mean
from strategies.records import cast_like, from_numpy, to_numpy

VELOCITY = "momentum/"  # checkpoint names of v, one array per model array


class FedAvgMParams(StrategyParams):
    name: Literal["fedavgm"] = "fedavgm"
    server_lr: float = Field(1.0, gt=0, description="eta: the server's step size")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="beta: the server's momentum")


@STRATEGIES.register("fedavgm", FedAvgMParams)
class FedAvgM(FedSparseStrategy):
    """FedAvg's sample-weighted mean, applied as a server step with momentum."""

    Params = FedAvgMParams
    params: FedAvgMParams
    client_programs: ClassVar[tuple[str, ...]] = ("sgd",)

    def __init__(self, params: FedAvgMParams, scenario: Scenario) -> None:
        super().__init__(params, scenario)
        self.velocity: dict[str, np.ndarray] = {}  # v_{t-1}; empty: zeros

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        mean = to_numpy(sample_weighted_mean([r.content.array_records[ARRAYS] for r in replies],
                                             [r.num_examples for r in replies]))
        beta, eta = self.params.server_momentum, self.params.server_lr
        new = {}
        for key, w in self.current.items():
            delta = w.astype(np.float64) - mean[key]
            self.velocity[key] = beta * self.velocity.get(key, 0.0) + delta
            new[key] = cast_like(w - eta * self.velocity[key], w.dtype)
        return from_numpy(new)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return super().state_arrays() | {VELOCITY + k: v for k, v in self.velocity.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.velocity = {k.removeprefix(VELOCITY): v for k, v in arrays.items()
                         if k.startswith(VELOCITY)}
