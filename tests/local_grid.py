"""An in-process stand-in for Flower's Grid, for fast wiring tests without Ray.

Every node runs the fedsparse ClientApp in this process with its own ``Context`` (node
config ``partition-id``/``num-partitions``, node ids 1000 + partition unless given), as the
Simulation Engine does, and keeps its
client state under ``state_dir`` (a temporary folder unless given); an exception in the
ClientApp becomes an error reply, as in Flower. A pushed message is answered at once;
``pull_messages`` hands out the replies to the ids it is given.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message, RecordDict

from clients.client_app import app as client_app
from fedsparse.checkpoint import Checkpoint
from fedsparse.client_state import StateStore
from fedsparse.protocol import RUN_CONFIG_DEFAULTS
from fedsparse.scenario import Scenario, parse_scenario
from fedsparse.tracking.history import Row
from strategies import server_app
from strategies.base import ClientRecord, FedSparseStrategy
from strategies.directory import Assigned
from strategies.loop import LoopState, run_rounds
from strategies.server_app import build_strategy, central_evaluator, initial_arrays

Tamper = Callable[[Message, Message], Message]


RUN_ID = "local-grid-run"


class LocalGrid:
    def __init__(self, num_nodes: int, run_config: dict, tamper: Tamper | None = None,
                 state_dir: Path | None = None, node_ids: list[int] | None = None) -> None:
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="fedsparse-clients-"))
            weakref.finalize(self, shutil.rmtree, state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True, exist_ok=True)  # as fedsparse run makes it (shared_root)
        self.state_dir = state_dir
        run_config = {"fedsparse-run-id": RUN_ID, "client-state-dir": str(state_dir),
                      **run_config}
        ids = node_ids or [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(),
                          node_config={"partition-id": i, "num-partitions": num_nodes},
                          run_config=run_config)
            for i, node in enumerate(ids)}
        self.tamper = tamper
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.outbox: dict[str, Message] = {}  # message id -> its reply, until pulled

    @staticmethod
    def partition_of(message: Message) -> int:
        """The partition id a message is for."""
        return int(message.content.config_records["config"]["partition-id"])

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.sent.append(message)
            try:
                reply = client_app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:
                reply = Message(Error(code=0, reason=repr(err)), reply_to=message)
            if self.tamper is not None:
                reply = self.tamper(message, reply)
            self.received.append(reply)
            self.outbox[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]

    def client_state(self, partition_id: int, commit_round: int
                     ) -> dict[str, dict[str, np.ndarray]]:
        """Client ``partition_id``'s state as of ``commit_round`` (what it starts from)."""
        run_id = next(iter(self.contexts.values())).run_config["fedsparse-run-id"]
        return StateStore(self.state_dir, str(run_id), partition_id).load(commit_round)[0]


def assigned(grid: LocalGrid, scenario: Scenario) -> Assigned:
    """The simulation's directory over ``grid``, started (one warm-up query)."""
    directory = Assigned(scenario, actors=1)
    directory.start(grid)
    return directory


@dataclass
class Federation:
    """A finished run on a :class:`LocalGrid`: what tests inspect."""

    scenario: Scenario
    grid: LocalGrid
    strategy: FedSparseStrategy
    state: LoopState
    rows: list[Row] = field(default_factory=list)
    records: list[ClientRecord] = field(default_factory=list)  # every round's (clients.csv)


def run_federation(scenario: Scenario, tamper: Tamper | None = None,
                   on_round: Callable[[int, Federation], None] | None = None,
                   state_dir: Path | None = None,
                   node_ids: list[int] | None = None) -> Federation:
    """The real ServerApp round loop and strategy over a :class:`LocalGrid` of as many nodes
    as the simulation runs (their ids: ``node_ids``); ``on_round(round, federation)`` runs
    after every round."""
    grid = LocalGrid(scenario.simulated_nodes(), {"scenario": scenario.to_toml()}, tamper,
                     state_dir, node_ids)
    strategy = build_strategy(scenario)
    strategy.bind(assigned(grid, scenario))
    federation = Federation(scenario, grid, strategy, LoopState(arrays=initial_arrays(scenario)))

    def hook(server_round: int, row: Row) -> None:
        federation.rows.append(row)
        federation.records += [r for r in strategy.client_records if r.round == server_round]
        if on_round is not None:
            on_round(server_round, federation)

    run_rounds(grid, scenario, strategy, federation.state, central_evaluator(scenario), hook)
    return federation


def serve(text: str, run_dir: Path, workdir: Path, *, resume: bool = False,
          tamper: Tamper | None = None, tracking_uri: str = "") -> None:
    """The real ServerApp (``strategies/server_app.py``) over a fresh :class:`LocalGrid`, with
    the run config ``fedsparse run`` would give it: its run folder ``run_dir``, the client
    state store under it, MLflow at ``tracking_uri`` (default: SQLite in ``workdir``); a
    resume keeps the fedsparse run id its checkpoint holds."""
    scenario = parse_scenario(text)
    run_id = Checkpoint.load(run_dir).state["fedsparse_run_id"] if resume else run_dir.name
    config = {**RUN_CONFIG_DEFAULTS, "scenario": scenario.to_toml(), "out-dir": str(run_dir),
              "tracking-uri": tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}",
              "artifact-location": (workdir / "mlruns").as_uri(),
              "resume-from": str(run_dir) if resume else "", "fedsparse-run-id": run_id,
              "client-state-dir": str(run_dir / "client-state")}
    grid = LocalGrid(scenario.simulated_nodes(), config, tamper,
                     state_dir=run_dir / "client-state")
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=config))
