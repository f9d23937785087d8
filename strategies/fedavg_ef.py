"""FedAvg with a compressed uplink and client-side error feedback (``fedsparse/
error_feedback.py``): clients send C(y_i - x + e_i), the server adds the sample-weighted mean
of the decoded messages to x. The baseline that shows what control variates add."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord

from fedsparse.compress import build_compressor
from fedsparse.error_feedback import FedAvgEFParams, server_step
from fedsparse.flat import flatten, unflatten
from fedsparse.protocol import UPDATE
from fedsparse.registry import STRATEGIES
from fedsparse.scenario import Scenario
from strategies.base import FedSparseStrategy, Reply
from strategies.records import Received, from_numpy


@STRATEGIES.register("fedavg_ef", FedAvgEFParams)
class FedAvgEF(FedSparseStrategy):
    Params = FedAvgEFParams
    client_programs: ClassVar[tuple[str, ...]] = ("compressed_sgd",)
    train_records: ClassVar[frozenset[str]] = frozenset({UPDATE})
    params: FedAvgEFParams

    def __init__(self, params: FedAvgEFParams, scenario: Scenario) -> None:
        super().__init__(params, scenario)
        self.compressor = None

    def check_train_reply(self, received: Received) -> np.ndarray:
        if self.compressor is None:
            self.compressor = build_compressor(self.params.compressor,
                                               [a.size for a in self.current.values()])
        d = sum(a.size for a in self.current.values())
        return self.compressor.decompress(received[UPDATE], d)

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        x = server_step(flatten(self.current), [r.decoded for r in replies],
                        [r.num_examples for r in replies], self.params.global_lr)
        return from_numpy(unflatten(x, self.current))
