"""FedAvg: federated averaging (McMahan et al., AISTATS 2017, arXiv:1602.05629, Algorithm 1).

Each round a fraction C of the K clients trains the global model w_t locally (E epochs or
K steps of SGD, see ``clients/programs/sgd.py``) and sends back its model w^k_{t+1}; the
server sets ``w_{t+1} = sum_k (n_k / n) w^k_{t+1}`` over the clients that replied, with
n_k the client's number of training examples and n their sum.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsparse.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from fedsparse.registry import STRATEGIES, StrategyParams
from strategies.base import FedSparseStrategy, Reply


class FedAvgParams(StrategyParams):
    name: Literal["fedavg"] = "fedavg"


@STRATEGIES.register("fedavg", FedAvgParams)
class FedAvg(FedSparseStrategy):
    """Sample-weighted FedAvg over the clients that replied, in partition-id order."""

    Params = FedAvgParams
    client_programs: ClassVar[tuple[str, ...]] = ("sgd", "continual")

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        # Flower's weighted average, given only the model and the weight of each reply.
        # (a reply may carry other records; only its model and num-examples are averaged)
        return aggregate_arrayrecords(
            [RecordDict({ARRAYS: r.content.array_records[ARRAYS],
                         METRICS: MetricRecord({NUM_EXAMPLES: r.num_examples})})
             for r in replies],
            NUM_EXAMPLES,
        )
