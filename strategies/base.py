"""Base of fedsparse's Flower strategies (Message API, ``flwr.serverapp.strategy.Strategy``).

What every fedsparse strategy shares, so that each strategy file holds only its own rule:

- clients are addressed by partition id, learned once per run (see ``strategies/loop.py``),
  and sampled with the scenario's seed, so a run samples the same clients every time
  whatever Flower's random node ids are;
- replies are handled in partition-id order, so float sums are bitwise reproducible;
- every reply is validated on receipt against what the server itself knows (its records,
  its metrics against ``protocol.REPLY_METRICS``, its round, ``num-examples`` against the
  examples the client can hold, its arrays decoded without trusting their headers, its
  decoded values finite and bounded); a failed (the ClientApp raised), unavailable (Flower's
  ``NODE_UNAVAILABLE``: its node cannot be reached), missing or malformed reply is recorded
  with its reason and left out of that round only;
- a round counts only with ``min_train_replies`` valid replies and a finite aggregate;
  otherwise the model and the server state stay as they were, and no client's update is
  committed (``commit-round``);
- the payload bytes of every message are counted per client: down from the arrays sent, up
  from the bytes received.

A subclass defines ``Params`` (its ``[strategy]`` section) and :meth:`aggregate`, and may
override :meth:`train_instruction` / :meth:`check_train_reply` for what crosses the wire.
"""

from __future__ import annotations

import logging
import random
from abc import abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsparse.compress import build_compressor
from fedsparse.data import client_indices
from fedsparse.downlink import PublicModel
from fedsparse.flat import flatten
from fedsparse.metrics.aggregate import (
    aggregate_client_metrics,
    bottom_decile_mean,
    unweighted_mean,
)
from fedsparse.models import scenario_model, shared_state
from fedsparse.payload import (
    PayloadError,
    check_bounded,
    check_count,
    check_dense,
    check_metrics,
)
from fedsparse.protocol import (
    ARRAYS,
    COMMIT_ROUND,
    CONFIG,
    METRICS,
    MODEL_SYNC,
    NUM_EXAMPLES,
    REPLY_METRICS,
    SERVER_ROUND,
    derive_seed,
)
from fedsparse.registry import StrategyParams
from fedsparse.scenario import Scenario
from strategies.directory import Directory
from strategies.records import Received, content_bytes, from_numpy, received_bytes, to_numpy

log = logging.getLogger("fedsparse.strategy")

TRAIN, EVALUATE = "train", "evaluate"
UNANSWERED = ("failed", "unavailable", "no-reply")  # statuses counted as clients_failed
ReplyCheck = Callable[[Received], Any]
COMMIT_PARTITIONS, COMMIT_ROUNDS, PUBLIC_PREFIX = "commit/partition", "commit/round", "public/"


@dataclass(frozen=True)
class Reply:
    """A client's reply that passed validation (``decoded``: what the check decoded)."""

    partition_id: int
    content: RecordDict
    num_examples: int
    metrics: dict[str, Any]
    decoded: Any = None


def no_arrays(received: Received) -> None:
    """The reply check of a phase whose replies carry metrics only (evaluation)."""


@dataclass
class ClientRecord:
    """One row of the per-client accounting table (``clients.csv``)."""

    round: int
    phase: str
    partition_id: int
    status: str = "sent"  # -> ok | failed | unavailable | rejected | no-reply
    reason: str = ""
    downlink_bytes: int = 0
    uplink_bytes: int = 0
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        base = {k: v for k, v in vars(self).items() if k != "metrics"}
        return {**base, **{k.replace("-", "_"): v for k, v in self.metrics.items()
                           if isinstance(v, int | float)}}


def personal_accuracy(replies: list[Reply]) -> dict[str, float]:
    """Clients' own test accuracy and loss (``eval-acc``, ``eval-loss``): weighted by their
    test examples, unweighted mean, and the mean over the worst 10% of clients (at least
    one), the fairness figure of personalised FL."""
    out = {}
    for key, name in (("eval-acc", "accuracy"), ("eval-loss", "loss")):
        pairs = [(float(r.metrics[key]), r.num_examples) for r in replies if key in r.metrics]
        if not pairs:
            continue
        values = [v for v, _ in pairs]
        out[f"{name}_weighted"] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        out[f"{name}_mean"] = unweighted_mean(values)
        if name == "accuracy":
            out[f"{name}_bottom10"] = bottom_decile_mean(values)
    return out


class FedSparseStrategy(Strategy):
    """Deterministic sampling, ordered and validated replies, exact byte accounting."""

    Params: ClassVar[type[StrategyParams]]
    # the client programs that speak this strategy's protocol (checked with the scenario)
    client_programs: ClassVar[tuple[str, ...]] = ("sgd",)
    # client metrics summed over clients (the others are averaged weighted by num-examples)
    summed_metrics: ClassVar[frozenset[str]] = frozenset(
        {"train-flops", "train-dense-flops", "train-steps", "train-examples",
         "examples-removed", "examples-remaining"})

    # the ArrayRecords a valid train reply may hold (besides its MetricRecord)
    train_records: ClassVar[frozenset[str]] = frozenset({ARRAYS})

    def __init__(self, params: StrategyParams, scenario: Scenario) -> None:
        self.params = params
        self.public: PublicModel | None = None  # the compressed downlink's x_hat
        self.scenario = scenario
        self.num_clients = scenario.data.num_clients
        self.pool = range(params.training_pool(self.num_clients))  # partitions that train
        # The most examples a client may claim; None: what its partition holds (simulation,
        # where the server knows the partitions); in deployment the scenario's cap.
        self.examples_cap: int | None = None
        self.directory: Directory | None = None  # partition id <-> Flower node id (bind)
        self.client_records: list[ClientRecord] = []  # this round's (see begin_round)
        self.current: dict[str, np.ndarray] = {}  # the global model sent this round
        # partition id -> last round its update counted (the commit-round it is told); also
        # the last round it holds the public model of: its state is as of that round
        self.accepted_round: dict[int, int] = {}
        self._pending: dict[tuple[int, str], dict[int, ClientRecord]] = {}

    # -- clients ------------------------------------------------------------------------
    def bind(self, directory: Directory) -> None:
        """Tell the strategy which Flower node serves each partition id in this run."""
        self.directory = directory

    def begin_round(self, server_round: int, grid: Grid) -> None:
        """Before round ``server_round``: forget the previous round's client records (on
        disk by now: ``clients.jsonl``), so that a round's work stays proportional to the
        clients it samples, and follow nodes that joined or left."""
        self.client_records.clear()
        self.bound.begin_round(grid)

    def sample(self, server_round: int, phase: str) -> list[int]:
        """Partition ids for ``phase`` of ``server_round``, drawn with the scenario's seed."""
        size = self.params.sample_size(len(self.pool), phase)
        if size == 0:
            return []
        rng = random.Random(f"{self.scenario.seed}:{phase}:{server_round}")
        return sorted(rng.sample(self.pool, size))

    def example_bound(self, partition_id: int, phase: str) -> float:
        """The most examples client ``partition_id`` can report for ``phase``: the size of
        its local train (training) or test split, or the deployment cap."""
        if self.examples_cap is not None:
            return self.examples_cap
        return client_indices(self.scenario.data, self.scenario.seed, partition_id).size(phase)

    # -- train --------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        if self.params.downlink is not None:
            self._advance_public(server_round)
        messages = []
        for pid in self.sample(server_round, TRAIN):
            # COMMIT_ROUND tells a stateful client whether its last update was counted
            config_i = ConfigRecord({**config, SERVER_ROUND: server_round,
                                     COMMIT_ROUND: self.accepted_round.get(pid, 0)})
            content = self.train_instruction(pid, arrays, config_i)
            if self.public is not None:  # the public model instead of the dense one
                sync = self.public.sync(self.accepted_round.get(pid))
                content = RecordDict({**{k: v for k, v in content.items() if k != ARRAYS},
                                      MODEL_SYNC: from_numpy(sync)})
            messages.append(self._send(server_round, TRAIN, pid, content))
        return [m for m in messages if m is not None]

    def _new_public(self) -> PublicModel:
        """An empty public model for ``strategy.downlink`` (per-tensor top-k: the tensors)."""
        sizes = [v.numel() for v in shared_state(scenario_model(self.scenario)).values()]
        return PublicModel(build_compressor(self.params.downlink, sizes))

    def _advance_public(self, server_round: int) -> None:
        if self.public is None:
            self.public = self._new_public()
        rng = np.random.default_rng(derive_seed(self.scenario.seed, "downlink", server_round))
        self.public.advance(server_round, flatten(self.current), rng)

    def train_instruction(self, partition_id: int, arrays: ArrayRecord,
                          config: ConfigRecord) -> RecordDict:
        """What client ``partition_id`` receives to train (default: the global model)."""
        return RecordDict({ARRAYS: arrays, CONFIG: config})

    def check_train_reply(self, received: Received) -> Any:
        """Raise :class:`PayloadError` unless ``received`` (a train reply's arrays, decoded
        defensively) is well formed; return what :meth:`aggregate` needs from it
        (``Reply.decoded``; every float array in it is then checked finite and within
        ``max_abs_value``).

        Default: a dense model of the same keys, shapes and dtypes as the one sent.
        """
        model = received[ARRAYS]
        check_dense(model, self.current)
        return model

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        accepted = self._receive(server_round, TRAIN, replies, self.check_train_reply)
        metrics = self._round_metrics(server_round, TRAIN, accepted)
        arrays = self._apply(server_round, accepted)
        metrics["round_counted"] = int(arrays is not None)
        return arrays, metrics

    def _apply(self, server_round: int, accepted: list[Reply]) -> ArrayRecord | None:
        """The round's new model, or None (model and server state unchanged) when it has
        fewer than ``min_train_replies`` valid replies or its result is not finite. Only an
        applied round commits its clients' updates."""
        needed = self.params.min_train_replies
        if len(accepted) < needed:
            log.warning("round %d: %d valid train replies, fewer than strategy."
                        "min_train_replies = %d; the global model is unchanged", server_round,
                        len(accepted), needed)
            return None
        before = {k: v.copy() for k, v in self.state_arrays().items()}
        arrays = self.aggregate(server_round, accepted)
        try:
            check_bounded(to_numpy(arrays), np.inf, "aggregate")
            check_bounded(self.state_arrays(), np.inf, "server state")
        except PayloadError as err:
            log.warning("round %d: %s; the global model and the server state are unchanged",
                        server_round, err)
            self.load_state_arrays(before)
            return None
        for reply in accepted:
            self.accepted_round[reply.partition_id] = server_round
        return arrays

    @abstractmethod
    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        """The new global model from the round's valid replies (in partition-id order)."""

    # -- evaluate -----------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = [self._send(server_round, EVALUATE, pid, RecordDict({ARRAYS: arrays, CONFIG:
                    ConfigRecord({**config, SERVER_ROUND: server_round,
                                  COMMIT_ROUND: self.accepted_round.get(pid, 0)})}))
                    for pid in self.sample(server_round, EVALUATE)]
        return [m for m in messages if m is not None]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        accepted = self._receive(server_round, EVALUATE, replies, no_arrays)
        metrics = self._round_metrics(server_round, EVALUATE, accepted)
        for key in ("eval_acc", "eval_loss"):
            metrics.pop(key, None)
        if not metrics["eval_clients_sampled"]:
            return metrics
        counted = len(accepted) >= self.params.min_evaluate_replies
        metrics["eval_counted"] = int(counted)
        if not counted:
            log.warning("round %d: %d valid evaluate replies, fewer than strategy."
                        "min_evaluate_replies = %d; no federated evaluation is reported",
                        server_round, len(accepted), self.params.min_evaluate_replies)
            return metrics
        for key, value in personal_accuracy(accepted).items():
            metrics[f"fed_{key}"] = value
        return metrics

    def task_views(self, arrays: ArrayRecord) -> dict[int, ArrayRecord] | None:
        """Per-task models, when each continual task has its own subnetwork (None: the one
        global model serves every task)."""
        return None

    def after_round(self, server_round: int, arrays: ArrayRecord,
                    grid: Grid) -> dict[str, float]:
        """Extra work after a round's aggregation (e.g. an audit), given the new global
        model; returns round metrics."""
        return {}

    def summary(self) -> None:
        log.info("%s: %s", type(self).__name__, self.params.model_dump())

    # -- server state beyond the model, for checkpoints ------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every server-side array besides the global model, for checkpoints: the commit
        round of every client and the compressed downlink's public model; a subclass adds
        its own to ``super().state_arrays()``. (The server keeps no random generator: all
        its randomness is derived from the seed and the round.)"""
        committed = sorted(self.accepted_round.items())
        out = {COMMIT_PARTITIONS: np.array([p for p, _ in committed], np.int64),
               COMMIT_ROUNDS: np.array([r for _, r in committed], np.int64)}
        if self.public is not None:
            out |= {PUBLIC_PREFIX + k: v for k, v in self.public.state_arrays().items()}
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` returned (a subclass extends it likewise)."""
        self.accepted_round = {int(p): int(r) for p, r in
                               zip(arrays[COMMIT_PARTITIONS], arrays[COMMIT_ROUNDS], strict=True)}
        public = {k[len(PUBLIC_PREFIX):]: v for k, v in arrays.items()
                  if k.startswith(PUBLIC_PREFIX)}
        if public:
            self.public = self._new_public()
            self.public.load_state_arrays(public)

    # -- plumbing -----------------------------------------------------------------------
    @property
    def bound(self) -> Directory:
        """The run's directory (:meth:`bind`)."""
        if self.directory is None:
            raise RuntimeError("the strategy is not bound to a run's nodes: call bind()")
        return self.directory

    def query(self, partition_id: int, config: ConfigRecord) -> Message | None:
        """A QUERY for client ``partition_id`` (None: no node serves it now)."""
        return self.bound.message(partition_id, RecordDict({CONFIG: config}),
                                  MessageType.QUERY)

    def _send(self, server_round: int, phase: str, partition_id: int,
              content: RecordDict) -> Message | None:
        """The instruction for one client, recorded as pending (None, recorded as
        unavailable: no node serves it now)."""
        message_type = MessageType.TRAIN if phase == TRAIN else MessageType.EVALUATE
        message = self.bound.message(partition_id, content, message_type)
        record = ClientRecord(server_round, phase, partition_id)
        if message is None:
            record.status, record.reason = "unavailable", "no connected node serves it"
        else:
            record.downlink_bytes = content_bytes(message.content)
        self._pending.setdefault((server_round, phase), {})[partition_id] = record
        return message

    def _receive(self, server_round: int, phase: str, replies: Iterable[Message],
                 check: ReplyCheck) -> list[Reply]:
        """Validate replies in partition-id order; record every client's outcome."""
        pending = self._pending.pop((server_round, phase), {})
        by_partition: dict[int, Message] = {}
        for message in replies:
            pid = self.bound.sender(message)
            if pid in pending and pid not in by_partition:
                by_partition[pid] = message
            else:
                log.warning("round %d %s: a reply from node %d to no instruction of this "
                            "phase ignored", server_round, phase, message.metadata.src_node_id)
        accepted = []
        for pid, record in sorted(pending.items()):
            message = by_partition.get(pid)
            if record.status == "unavailable":
                pass  # never sent: no node served it
            elif message is None:
                record.status, record.reason = "no-reply", "no reply before the round timeout"
            elif message.has_error():  # the ClientApp raised, or its node cannot be reached
                record.status = "unavailable" if message.error.code == \
                    ErrorCode.NODE_UNAVAILABLE else "failed"
                record.reason = str(message.error.reason)
            else:
                record.uplink_bytes = received_bytes(message.content)
                try:
                    reply = self._validate(server_round, phase, pid, message.content, check)
                except PayloadError as err:
                    record.status, record.reason = "rejected", str(err)
                except Exception as err:  # a check that trips over hostile input
                    log.exception("round %d %s: client %d: reply check raised", server_round,
                                  phase, pid)
                    record.status, record.reason = "rejected", f"{type(err).__name__}: {err}"
                else:
                    record.status, record.num_examples = "ok", reply.num_examples
                    record.metrics = reply.metrics
                    accepted.append(reply)
            if record.status != "ok":
                log.warning("round %d %s: client %d %s: %s", server_round, phase, pid,
                            record.status, record.reason)
            self.client_records.append(record)
        return accepted

    def _validate(self, server_round: int, phase: str, partition_id: int, content: RecordDict,
                  check: ReplyCheck) -> Reply:
        """Every field of a reply against what the server knows, then ``check`` on its
        arrays; raises PayloadError with the first problem found."""
        allowed = {METRICS} | (self.train_records if phase == TRAIN else set())
        names = [*content.array_records, *content.metric_records, *content.config_records]
        unexpected = sorted(set(names) - allowed)
        if unexpected:
            raise PayloadError(f"unexpected records {unexpected}; a {phase} reply holds "
                               f"{sorted(allowed)}")
        if METRICS not in content.metric_records:
            raise PayloadError(f"no MetricRecord {METRICS!r} in reply")
        metrics = check_metrics(content.metric_records[METRICS], REPLY_METRICS)
        answered = metrics.get(SERVER_ROUND)
        if answered != server_round:
            raise PayloadError(f"{SERVER_ROUND} = {answered!r}: a reply to another round than "
                               f"{server_round}")
        num_examples = check_count(metrics.get(NUM_EXAMPLES), NUM_EXAMPLES,
                                   self.example_bound(partition_id, phase))
        decoded = check(Received(content))
        check_bounded(decoded, self.params.max_abs_value)
        return Reply(partition_id, content, num_examples, metrics, decoded)

    def _round_metrics(self, server_round: int, phase: str, accepted: list[Reply]) -> MetricRecord:
        """Aggregated client metrics plus the round's byte and client counts."""
        records = [r for r in self.client_records if r.round == server_round and r.phase == phase]
        prefix = "" if phase == TRAIN else "eval_"
        client_metrics = aggregate_client_metrics(
            [{k: v for k, v in r.metrics.items() if k not in (NUM_EXAMPLES, SERVER_ROUND)}
             for r in accepted],
            [r.num_examples for r in accepted], self.summed_metrics)
        out = {k.replace("-", "_"): v for k, v in client_metrics.items()}
        out |= {
            f"{prefix}uplink_bytes": sum(r.uplink_bytes for r in records),
            f"{prefix}downlink_bytes": sum(r.downlink_bytes for r in records),
            f"{prefix}clients_sampled": len(records),
            f"{prefix}clients_ok": len(accepted),
            f"{prefix}clients_failed": sum(r.status in UNANSWERED for r in records),
            f"{prefix}clients_rejected": sum(r.status == "rejected" for r in records),
        }
        return MetricRecord(out)
