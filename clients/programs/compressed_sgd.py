"""The client of compressed FedAvg (``fedavg_ef``): local SGD as FedAvg's ClientUpdate, then
the update ``y - x`` is sent compressed, with error feedback (``fedsparse/error_feedback.py``).

State: ``ef`` = the residual e_i as of the last round the server counted (a round it did
not count leaves the residual as it was: ``fedsparse/client_state.py``).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from clients.programs.sgd import SGDParams, SGDProgram
from fedsparse.compress import build_compressor
from fedsparse.error_feedback import ef_message
from fedsparse.protocol import METRICS, SERVER_ROUND, UPDATE, derive_seed
from fedsparse.registry import CLIENT_PROGRAMS
from fedsparse.scaffold import flat_parameters

STATE = "ef"


class CompressedSGDParams(SGDParams):
    program: Literal["compressed_sgd"] = "compressed_sgd"  # type: ignore[assignment]


@CLIENT_PROGRAMS.register("compressed_sgd", CompressedSGDParams)
class CompressedSGD(SGDProgram):
    Params = CompressedSGDParams
    params: CompressedSGDParams

    def train(self, content: RecordDict) -> RecordDict:
        started = time.perf_counter()
        model = self.model_from(content)
        x = flat_parameters(model)
        residual = self.state.get(STATE).get("residual", np.zeros_like(x))
        result = self.local_sgd(model, content)
        rule = self.scenario.strategy
        rng = np.random.default_rng(derive_seed(self.scenario.seed, self.partition_id,
                                                int(self.config(content)[SERVER_ROUND]),
                                                "compress"))
        sizes = [q.numel() for q in model.parameters()]
        message = ef_message(flat_parameters(model) - x, residual,
                             build_compressor(rule.compressor, sizes), rng, rule.error_feedback)
        self.state.put(STATE, {"residual": message.residual})
        update = ArrayRecord({k: Array(v) for k, v in message.payload.items()})
        return RecordDict({UPDATE: update, METRICS: self.train_metrics(result, started)})
