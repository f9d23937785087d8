"""The client of the SCAFFOLD family (SCAFFOLD, SCALLION, SCAFCOM): K corrected SGD steps,
one compressed message, control variate and momentum kept as client state.

The maths is ``fedsparse/scaffold.py``; this program moves it in and out of Flower records.
State: ``control`` = {c_i, v_i}. After a round the client saves ``c_i + alpha * delta`` and
the new v_i, which hold only if the server counts the message (``fedsparse/
client_state.py``): a lost or rejected message leaves both as they were, so c = mean c_i
holds whatever is lost.
"""

from __future__ import annotations

import time
from itertools import islice
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from pydantic import Field

from clients.programs.base import ClientProgram
from fedsparse.compress import build_compressor
from fedsparse.protocol import CONTROL, METRICS, SERVER_ROUND, UPDATE, derive_seed
from fedsparse.registry import CLIENT_PROGRAMS, PluginParams
from fedsparse.scaffold import ControlState, client_message, local_steps, step_direction
from fedsparse.training import batches, cross_entropy

STATE = "control"


class ControlledSGDParams(PluginParams):
    program: Literal["controlled_sgd"] = "controlled_sgd"
    lr: float = Field(0.05, gt=0, description="eta_l")
    batch_size: int = Field(32, ge=1)
    local_steps: int = Field(10, ge=1, description="K: exactly K plain SGD steps")


@CLIENT_PROGRAMS.register("controlled_sgd", ControlledSGDParams)
class ControlledSGD(ClientProgram):
    Params = ControlledSGDParams
    params: ControlledSGDParams

    def control(self, d: int) -> ControlState:
        """c_i and v_i as of the last round the server counted (zeros before any)."""
        arrays = self.state.get(STATE)
        if not arrays:
            return ControlState.zeros(d)
        return ControlState(arrays["c_i"], arrays["v_i"])

    def train(self, content: RecordDict) -> RecordDict:
        started = time.perf_counter()
        model = self.model_from(content)
        sizes = [p.numel() for p in model.parameters()]
        c = content.array_records[CONTROL]["c"].numpy()
        state = self.control(sum(sizes))
        rule = self.scenario.strategy.rule()
        shift, grad_scale = step_direction(rule, state, c)
        data = self.data
        stream = ((data.x_train[idx], data.y_train[idx]) for idx in
                  batches(len(data.x_train), self.params.batch_size, self.generator(content)))
        result = local_steps(model, islice(stream, self.params.local_steps), cross_entropy,
                             self.params.lr, shift, grad_scale, self.device)
        server_round = int(self.config(content)[SERVER_ROUND])
        rng = np.random.default_rng(derive_seed(self.scenario.seed, self.partition_id,
                                                server_round, "compress"))
        message = client_message(rule.variant, result.g_bar, state,
                                 build_compressor(rule.compressor, sizes), rng, rule.alpha,
                                 rule.beta)
        self.state.put(STATE, {"c_i": state.c_i + message.c_i_step, "v_i": state.v_i})
        update = ArrayRecord({k: Array(v) for k, v in message.payload.items()})
        return RecordDict({UPDATE: update, METRICS: self.train_metrics(result, started)})

    def query(self, content: RecordDict) -> RecordDict:
        """The audit: this client's c_i as the server should count it (after commit)."""
        d = sum(p.numel() for p in self.build_model().parameters())
        return RecordDict({CONTROL: ArrayRecord({"c_i": Array(self.control(d).c_i)})})
