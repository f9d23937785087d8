"""SCAFFOLD (one uplink vector), SCALLION and SCAFCOM: stochastic controlled averaging with
communication compression (Huang, Li & Li, ICLR 2024; Karimireddy et al., ICML 2020).

Server state: the model x and the global control variate c (zeros at start). Each round the
sampled clients receive x and c (two dense vectors), run ``clients/programs/
controlled_sgd.py`` and send one (compressed) vector delta_i each; the server decodes and
validates each message and applies ``fedsparse.scaffold.server_update``: uniform weights,
model step averaged over the accepted messages, control step divided by N. The update rules
and the reading chosen where the paper's listing is uncertain are documented in
``fedsparse/scaffold.py``.

With ``audit = true`` the server asks every client for its c_i after each round and logs
``audit_control_gap = max |c - mean_i c_i|`` (the invariant the method relies on) and
``audit_clients_answered``; when a client does not answer (or answers malformed) the round
has no gap, and the run goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedsparse.compress import build_compressor
from fedsparse.compress.base import expect_array
from fedsparse.flat import flatten, unflatten
from fedsparse.models import scenario_model
from fedsparse.payload import PayloadError
from fedsparse.protocol import ARRAYS, COMMIT_ROUND, CONFIG, CONTROL, QUERY, UPDATE
from fedsparse.registry import STRATEGIES
from fedsparse.scaffold import ScafcomParams, ScaffoldParams, ScallionParams, server_update
from fedsparse.scenario import Scenario
from strategies.base import FedSparseStrategy, Reply
from strategies.exchange import exchange
from strategies.records import Received, from_numpy

log = logging.getLogger("fedsparse.strategy")
CONTROL_VARIATE = "c"


class ControlledAveraging(FedSparseStrategy):
    """The server side shared by SCAFFOLD, SCALLION and SCAFCOM."""

    Params: ClassVar[type[ScaffoldParams]]
    client_programs: ClassVar[tuple[str, ...]] = ("controlled_sgd",)
    train_records: ClassVar[frozenset[str]] = frozenset({UPDATE})
    params: ScaffoldParams

    def __init__(self, params: ScaffoldParams, scenario: Scenario) -> None:
        super().__init__(params, scenario)
        self.rule = params.rule()
        client = scenario.client
        self.gamma = params.global_lr * client.lr * client.local_steps  # eta_g eta_l K
        self.c: np.ndarray | None = None
        self.compressor = None
        self.last_density = 0.0
        if any(True for _ in scenario_model(scenario).buffers()):
            raise ValueError(f"strategy {params.name!r}: the model has buffers (e.g. BatchNorm "
                             f"statistics), which the control variates do not cover")

    def _setup(self) -> None:
        """Control variate (unless restored) and decoder, sized from the first model sent."""
        if self.c is None:
            self.c = np.zeros(flatten(self.current).size, np.float32)
        if self.compressor is None:
            self.compressor = build_compressor(self.rule.compressor,
                                               [a.size for a in self.current.values()])

    def train_instruction(self, partition_id: int, arrays: ArrayRecord,
                          config: ConfigRecord) -> RecordDict:
        self._setup()
        return RecordDict({ARRAYS: arrays, CONTROL: ArrayRecord({"c": Array(self.c)}),
                           CONFIG: config})

    def check_train_reply(self, received: Received) -> np.ndarray:
        # finite values can overflow once rescaled (d/k): the base checks what this decodes
        return self.compressor.decompress(received[UPDATE], self.c.size)

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        deltas = [r.decoded for r in replies]
        x, self.c = server_update(flatten(self.current), self.c, deltas, self.num_clients,
                                  self.gamma, self.rule.alpha)
        self.last_density = float(np.mean([np.count_nonzero(d) / d.size for d in deltas]))
        return from_numpy(unflatten(x, self.current))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            metrics["update_density"] = self.last_density
        metrics["control_norm"] = float(np.linalg.norm(self.c)) if self.c is not None else 0.0
        return arrays, metrics

    def state_arrays(self) -> dict[str, np.ndarray]:
        return super().state_arrays() | ({} if self.c is None else {CONTROL_VARIATE: self.c})

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.c = arrays.get(CONTROL_VARIATE)

    def after_round(self, server_round: int, arrays: ArrayRecord,
                    grid: Grid) -> dict[str, float]:
        if not self.params.audit or self.c is None:
            return {}
        queries = [q for pid in range(self.num_clients) if (q := self.query(pid, ConfigRecord(
                   {QUERY: "control", COMMIT_ROUND: self.accepted_round.get(pid, 0)})))]
        c_i = {}
        for reply in exchange(grid, queries, self.scenario.run.round_timeout_s):
            pid = self.bound.sender(reply)
            try:
                if pid is None:
                    raise PayloadError(f"node {reply.metadata.src_node_id} answered no query of "
                                       "this audit")
                if reply.has_error():
                    raise PayloadError(str(reply.error.reason))
                c_i[pid] = expect_array(Received(reply.content)[CONTROL], "c_i",
                                        np.dtype(np.float32), self.c.size)
            except PayloadError as err:
                log.warning("round %d audit: client %s: %s", server_round, pid, err)
        answered = {"audit_clients_answered": len(c_i)}
        if len(c_i) < self.num_clients:  # the gap needs every c_i; the run goes on
            log.warning("round %d audit: %d of %d clients answered; no control gap",
                        server_round, len(c_i), self.num_clients)
            return answered
        c_mean = np.mean([c_i[pid] for pid in sorted(c_i)], axis=0)
        return {**answered, "audit_control_gap": float(np.abs(self.c - c_mean).max())}


@STRATEGIES.register("scaffold", ScaffoldParams)
class Scaffold(ControlledAveraging):
    """SCAFFOLD with one dense float32 vector up per client (ALGORITHMS.md section 1.2)."""

    Params = ScaffoldParams


@STRATEGIES.register("scallion", ScallionParams)
class Scallion(ControlledAveraging):
    """SCALLION: unbiased compression, control scaling alpha (section 1.3)."""

    Params = ScallionParams


@STRATEGIES.register("scafcom", ScafcomParams)
class Scafcom(ControlledAveraging):
    """SCAFCOM: biased compression with local momentum beta (section 1.4)."""

    Params = ScafcomParams
