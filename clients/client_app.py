"""The fedsparse ClientApp: the same app in Ray simulation and on real SuperNodes.

Every instruction names the partition it is for (``partition-id`` in its config: see
``strategies/directory.py``). In simulation (the run config's ``federation``) the client
serves that partition: the server assigns partitions to the simulated nodes, whose own
numbering it cannot see. On a device the partition is the node config's (``partition-id``,
``num-partitions``: ``flower-supernode --node-config``), and an instruction naming another
one is refused. The scenario comes from the run config. Each message is handed to the
scenario's client program; a train or evaluate reply echoes the instruction's round
(``server-round``), so that the server can tell a reply to another round from one to the
round it is in.

Client state (``fedsparse/client_state.py``) is read as of the instruction's
``commit-round`` and, after a train instruction, saved for its round, under: the node
config's ``state-dir`` (``flower-supernode --node-config "... state-dir=/var/lib/fedsparse"``:
a device's own choice, which a submitted run cannot override), else the run config's
``client-state-dir`` (simulation: the run folder's ``client-state/``, which this node must
see: ``fedsparse.client_state.shared_root``), else
``$FEDSPARSE_CLIENT_STATE_DIR``, else ``~/.fedsparse/client-state``; keyed by the run
config's ``fedsparse-run-id`` (which a resume keeps) and the partition id.

Train and evaluate calls go through the scenario's fault injection (``[faults]``,
``clients/faults.py``); queries never do.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.faults import with_faults
from clients.programs.base import ClientProgram
from fedsparse.client_state import ClientState, StateStore, shared_root
from fedsparse.data import client_data
from fedsparse.protocol import (
    COMMIT_ROUND,
    CONFIG,
    METRICS,
    NUM_PARTITIONS,
    PARTITION_ID,
    QUERY,
    SERVER_ROUND,
    run_setting,
)
from fedsparse.registry import CLIENT_PROGRAMS
from fedsparse.scenario import Scenario, parse_scenario

STATE_DIR_NODE_KEY, STATE_DIR_ENV = "state-dir", "FEDSPARSE_CLIENT_STATE_DIR"
app = ClientApp()


@lru_cache(maxsize=4)
def _scenario(text: str) -> Scenario:
    return parse_scenario(text, source="run config 'scenario'")


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, with a clear error if absent."""
    try:
        return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err.args[0]!r}: start the SuperNode with "
            f"--node-config \"{PARTITION_ID}=<i> {NUM_PARTITIONS}=<n>\"") from None


def state_root(context: Context) -> Path:
    """Where this node keeps client state (see the module docstring)."""
    configured = str(context.node_config.get(STATE_DIR_NODE_KEY, "")) \
        or shared_root(run_setting(context.run_config, "client-state-dir")) \
        or os.environ.get(STATE_DIR_ENV, "")
    return Path(configured or "~/.fedsparse/client-state").expanduser()


def scenario_of(context: Context) -> Scenario:
    """The scenario of this node's run (from the run config)."""
    return _scenario(run_setting(context.run_config, "scenario"))


def simulated(context: Context) -> bool:
    """Whether this node is one of the Simulation Engine's (the run config's federation)."""
    return run_setting(context.run_config, "federation") == "simulation"


def served_partition(msg: Message, context: Context) -> int:
    """The partition an instruction is for (see the module docstring); ValueError if this
    node cannot serve it."""
    scenario = scenario_of(context)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    named = config.get(PARTITION_ID)
    if simulated(context):
        if not isinstance(named, int) or not 0 <= named < scenario.data.num_clients:
            raise ValueError(f"a simulated client needs its {PARTITION_ID} (0 to "
                             f"{scenario.data.num_clients - 1}) in the instruction, got "
                             f"{named!r}")
        return named
    partition_id, num_partitions = node_partition(context)
    if num_partitions != scenario.data.num_clients:
        raise ValueError(f"node config {NUM_PARTITIONS}={num_partitions} but the scenario has "
                         f"data.num_clients={scenario.data.num_clients}")
    if named is not None and named != partition_id:
        raise ValueError(f"this node serves {PARTITION_ID}={partition_id}, not the "
                         f"{PARTITION_ID}={named!r} the instruction is for")
    return partition_id


def client_of(msg: Message, context: Context) -> tuple[Scenario, int]:
    """The scenario and the partition of one call."""
    return scenario_of(context), served_partition(msg, context)


def program_for(msg: Message, context: Context) -> ClientProgram:
    """The scenario's client program for this instruction, with its state."""
    scenario, partition_id = client_of(msg, context)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    run_id = run_setting(context.run_config, "fedsparse-run-id") or str(context.run_id)
    state = ClientState(StateStore(state_root(context), run_id, partition_id),
                        commit_round=int(config.get(COMMIT_ROUND, 0)),
                        server_round=int(config.get(SERVER_ROUND, 0)))
    program = CLIENT_PROGRAMS.get(scenario.client.program).impl
    return program(scenario, partition_id, state)


def warm_up(scenario: Scenario, partition_id: int) -> None:
    """What a process's first train call would otherwise pay, done before round 1 (the
    server waits up to ``run.node_wait_s`` for it), whereas seconds spent in the first round
    (importing flwr-datasets and partitioning to load a client's data, cached per process;
    torch.optim importing ``torch._dynamo`` when it builds its first optimizer) come out of
    ``run.round_timeout_s``, and a timeout of a few seconds would drop every reply of the
    first rounds."""
    client_data(scenario.data, scenario.seed, partition_id)
    importlib.import_module("torch._dynamo")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """By default, warm up (:func:`warm_up`) and say which partition this node serves (on a
    device without node authentication, the server asks each new node); a query naming a
    ``query`` in its config goes to the client program."""
    config = msg.content.config_records.get(CONFIG)
    if config is not None and config.get(QUERY, ""):
        return Message(program_for(msg, context).query(msg.content), reply_to=msg)
    scenario = scenario_of(context)
    if simulated(context):
        partition_id, num_partitions = served_partition(msg, context), scenario.data.num_clients
    else:
        partition_id, num_partitions = node_partition(context)
    if num_partitions == scenario.data.num_clients:  # else the server says what is wrong
        warm_up(scenario, partition_id)
    metrics = MetricRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def answer(msg: Message, content: RecordDict) -> Message:
    """The reply to ``msg``, its metrics stamped with the round they answer."""
    config = msg.content.config_records.get(CONFIG)
    if config is not None and SERVER_ROUND in config and METRICS in content.metric_records:
        content.metric_records[METRICS][SERVER_ROUND] = int(config[SERVER_ROUND])
    return Message(content, reply_to=msg)


@app.train()
@with_faults(client_of)
def train(msg: Message, context: Context) -> Message:
    program = program_for(msg, context)
    reply = program.train(msg.content)
    program.state.save()  # the state this client holds if the server counts the round
    return answer(msg, reply)


@app.evaluate()
@with_faults(client_of)
def evaluate(msg: Message, context: Context) -> Message:
    return answer(msg, program_for(msg, context).evaluate(msg.content))
