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
from strategies.records import cast_like, from_numpy, to_numpy


class FedAvgParams(StrategyParams):
    name: Literal["fedavg"] = "fedavg"


@STRATEGIES.register("fedavg", FedAvgParams)
class FedAvg(FedSparseStrategy):
    """Sample-weighted FedAvg over the clients that replied, in partition-id order."""

    Params = FedAvgParams
    client_programs: ClassVar[tuple[str, ...]] = ("sgd", "continual")

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        return sample_weighted_mean([r.content.array_records[ARRAYS] for r in replies],
                                    [r.num_examples for r in replies])


def sample_weighted_mean(models: list[ArrayRecord], num_examples: list[int]) -> ArrayRecord:
    """``sum_k (n_k / n) w_k``: Flower's weighted average, given only the models and their
    weights (a reply may carry other records; only its model is averaged). Each array keeps
    the models' dtype; integer ones (e.g. BatchNorm's batch counter) are rounded."""
    mean = to_numpy(aggregate_arrayrecords(
        [RecordDict({ARRAYS: model, METRICS: MetricRecord({NUM_EXAMPLES: n})})
         for model, n in zip(models, num_examples, strict=True)],
        NUM_EXAMPLES,
    ))
    reference = models[0]
    return from_numpy({key: cast_like(value, reference[key].numpy().dtype)
                       for key, value in mean.items()})
