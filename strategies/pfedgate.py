"""pFedGate's server (Chen et al., ICML 2023, Algorithm 1, server side; ALGORITHMS.md §2.4).

The server keeps only the shared base model ``theta``; every client's gating layer and
optimiser state stay on the client (``clients/programs/pfedgate.py``). Each round it sends
``theta`` dense to the sampled clients and receives from each the blocks of ``theta`` it used
in the round (block ids + values); a block a client did not use counts as unchanged (its
value is ``theta``'s). Aggregation (``aggregation``, recorded with the run):

- ``"sampled"`` (default): the sample-weighted mean over the clients that replied,
  ``theta <- sum_i (n_i / sum_j n_j) theta_i``;
- ``"all_clients"``: the release's weights ``n_i / n`` over *all* clients in its "online"
  mode, a client not sampled contributing the current ``theta``: ``theta <- theta + sum_i
  (n_i / n) (theta_i - theta)``; the clients' sizes are asked once. (The release's default
  "load-all" mode, where a client not sampled contributes the stale model it last held, is
  not implemented.)

Evaluation is personalised: each client evaluates its own gated sparse model on its local
test split (``fed_accuracy_*``); the centralised evaluation is the global ``theta`` without
gates. The last ``novel_clients`` partitions never train: after the last round each of them
receives ``theta``, fits only its gating layer for ``novel_steps`` minibatches and is
evaluated the same way (``novel_accuracy_*``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from pydantic import Field

from clients.programs.pfedgate import BLOCKS, BUFFER_PREFIX, VALUES
from fedsparse.compress import indices
from fedsparse.compress.base import expect_array
from fedsparse.metrics.aggregate import unweighted_mean
from fedsparse.models import scenario_model
from fedsparse.payload import PayloadError, check_count, check_dense
from fedsparse.personal import BlockPartition
from fedsparse.protocol import (
    ADAPT_STEPS,
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    QUERY,
    SERVER_ROUND,
    UPDATE,
)
from fedsparse.registry import STRATEGIES, StrategyParams
from fedsparse.scenario import Scenario
from strategies.base import (
    EVALUATE,
    TRAIN,
    FedSparseStrategy,
    Reply,
    no_arrays,
    personal_accuracy,
)
from strategies.exchange import exchange
from strategies.fedavg import sample_weighted_mean
from strategies.records import Received, cast_like, from_numpy

NOVEL = "novel"
SIZE_PARTITIONS, SIZES = "sizes/partition", "sizes/examples"
log = logging.getLogger("fedsparse.strategy")


class PFedGateParams(StrategyParams):
    name: Literal["pfedgate"] = "pfedgate"
    own_downlink: ClassVar[str] = ("sends the dense base model, over which the server places "
                                   "the blocks a client sends")
    aggregation: Literal["sampled", "all_clients"] = Field(
        "sampled", description="weights over the sampled clients, or over all clients")
    novel_clients: int = Field(0, ge=0, description="last partitions held out of training")
    novel_steps: int = Field(20, ge=0, description="minibatches a novel client fits its gates")

    def training_pool(self, num_clients: int) -> int:
        return num_clients - self.novel_clients

    def clients_at_once(self, num_clients: int) -> int:
        return max(super().clients_at_once(num_clients), self.novel_clients)

    def check_scenario(self, scenario: Any) -> None:
        if self.novel_clients >= scenario.data.num_clients:
            raise ValueError(f"strategy.novel_clients = {self.novel_clients} leaves no client "
                             f"to train (data.num_clients = {scenario.data.num_clients})")


@STRATEGIES.register("pfedgate", PFedGateParams)
class PFedGate(FedSparseStrategy):
    Params = PFedGateParams
    params: PFedGateParams
    client_programs: ClassVar[tuple[str, ...]] = ("pfedgate",)
    train_records: ClassVar[frozenset[str]] = frozenset({UPDATE})

    def __init__(self, params: PFedGateParams, scenario: Scenario) -> None:
        super().__init__(params, scenario)
        self.partition = BlockPartition(scenario_model(scenario),
                                        scenario.client.blocks_per_tensor)
        self.param_names = set(dict(scenario_model(scenario).named_parameters()))
        self.data_sizes: dict[int, int] = {}  # all_clients: partition id -> n_i

    # -- train --------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.params.aggregation == "all_clients":
            self._ask_sizes(grid)
        return super().configure_train(server_round, arrays, config, grid)

    def _ask_sizes(self, grid: Grid) -> None:
        """Ask the clients whose training-set size is not known yet (once each; a client
        that does not answer is asked again next round and left out of ``n`` meanwhile)."""
        missing = [pid for pid in self.pool if pid not in self.data_sizes]
        if not missing:
            return
        queries = [q for pid in missing
                   if (q := self.query(pid, ConfigRecord({QUERY: NUM_EXAMPLES}))) is not None]
        for reply in exchange(grid, queries, self.scenario.run.round_timeout_s):
            pid = self.bound.sender(reply)
            try:
                if pid is None or reply.has_error():
                    raise PayloadError(reply.error.reason if reply.has_error()
                                       else "a reply to no query of this round")
                self.data_sizes[pid] = check_count(
                    reply.content.metric_records[METRICS][NUM_EXAMPLES], NUM_EXAMPLES,
                    self.example_bound(pid, TRAIN))
            except (PayloadError, KeyError) as err:
                log.warning("client %s did not report its size: %s", pid, err)

    def check_train_reply(self, received: Received) -> dict[str, np.ndarray]:
        """The client's ``theta_i``: its used blocks over the ``theta`` that was sent."""
        update = received[UPDATE]
        scheme, coded = indices.find(update, f"{BLOCKS}.")
        used = np.zeros(len(self.partition), bool)
        used[indices.decode(scheme, coded, len(self.partition))] = True
        keep = torch.from_numpy(used)
        if not bool(keep[self.partition.first].all()):
            raise PayloadError(f"{BLOCKS}: the first block of every tensor must be sent")
        size = int(self.partition.sizes[keep].sum())
        values = expect_array(update, VALUES, np.dtype(np.float32), size)
        buffers = {k[len(BUFFER_PREFIX):]: v for k, v in update.items()
                   if k.startswith(BUFFER_PREFIX)}
        check_dense(buffers, {k: v for k, v in self.current.items() if k not in self.param_names})
        extra = sorted(set(update) - {f"{BLOCKS}.{indices.KEY}.{scheme}", VALUES}
                       - {BUFFER_PREFIX + k for k in buffers})
        if extra:
            raise PayloadError(f"unexpected arrays {extra}")
        theta = {k: torch.from_numpy(v.copy()) for k, v in self.current.items()}
        self.partition.scatter(torch.from_numpy(values.copy()), keep, theta)
        return {k: v.numpy() for k, v in theta.items()} | buffers

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        models = [from_numpy(r.decoded) for r in replies]
        if self.params.aggregation == "sampled":
            return sample_weighted_mean(models, [r.num_examples for r in replies])
        sizes = {r.partition_id: self.data_sizes.get(r.partition_id, r.num_examples)
                 for r in replies}
        total = sum((self.data_sizes | sizes).values())
        model = {}
        for name, theta in self.current.items():
            step = sum((sizes[r.partition_id] / total)
                       * (r.decoded[name].astype(np.float64) - theta) for r in replies)
            model[name] = cast_like(theta + step, theta.dtype)
        return from_numpy(model)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        ok = [r for r in self.client_records
              if r.round == server_round and r.phase == "train" and r.status == "ok"]
        for key in ("budget", "density", "active-density"):
            values = [float(r.metrics[key]) for r in ok if key in r.metrics]
            if values:
                metrics[f"{key.replace('-', '_')}_mean"] = unweighted_mean(values)
        return arrays, metrics

    # -- checkpoint -----------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        sizes = sorted(self.data_sizes.items())
        return {**super().state_arrays(),
                SIZE_PARTITIONS: np.array([p for p, _ in sizes], np.int64),
                SIZES: np.array([n for _, n in sizes], np.int64)}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        self.data_sizes = {int(p): int(n) for p, n in
                           zip(arrays[SIZE_PARTITIONS], arrays[SIZES], strict=True)}

    # -- novel clients ------------------------------------------------------------------
    def after_round(self, server_round: int, arrays: ArrayRecord,
                    grid: Grid) -> dict[str, float]:
        if server_round != self.scenario.run.rounds or not self.params.novel_clients:
            return {}
        config = ConfigRecord({SERVER_ROUND: server_round, ADAPT_STEPS: self.params.novel_steps})
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        messages = [m for pid in range(self.pool.stop, self.num_clients)
                    if (m := self._send(server_round, NOVEL, pid, content)) is not None]
        replies = exchange(grid, messages, self.scenario.run.round_timeout_s)
        accepted = self._receive(server_round, NOVEL, replies, no_arrays)
        return {**{f"novel_{k}": v for k, v in personal_accuracy(accepted).items()},
                "novel_clients_ok": len(accepted)}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        metrics = super().aggregate_evaluate(server_round, replies)
        ok = [r for r in self.client_records
              if r.round == server_round and r.phase == EVALUATE and r.status == "ok"]
        density = [float(r.metrics["eval-density"]) for r in ok if "eval-density" in r.metrics]
        if density:
            metrics["eval_density_mean"] = unweighted_mean(density)
        return metrics
