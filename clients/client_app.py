"""The fedsparse ClientApp: the same app in Ray simulation and on real SuperNodes.

A client finds its data from its node config (``partition-id``, ``num-partitions``: set by
the Simulation Engine, or by ``flower-supernode --node-config`` in deployment) and the
scenario from the run config. Each message is handed to the scenario's client program; a
train or evaluate reply echoes the instruction's round (``server-round``), so that the
server can tell a reply to another round from one to the round it is in.

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


def client_of(context: Context) -> tuple[Scenario, int]:
    """This node's scenario and partition id."""
    return scenario_of(context), node_partition(context)[0]


def program_for(context: Context, content: RecordDict) -> ClientProgram:
    """The scenario's client program for this node and instruction, with its state."""
    scenario = scenario_of(context)
    partition_id, num_partitions = node_partition(context)
    if num_partitions != scenario.data.num_clients:
        raise ValueError(f"node config {NUM_PARTITIONS}={num_partitions} but the scenario has "
                         f"data.num_clients={scenario.data.num_clients}")
    config = content.config_records.get(CONFIG, ConfigRecord())
    run_id = run_setting(context.run_config, "fedsparse-run-id") or str(context.run_id)
    state = ClientState(StateStore(state_root(context), run_id, partition_id),
                        commit_round=int(config.get(COMMIT_ROUND, 0)),
                        server_round=int(config.get(SERVER_ROUND, 0)))
    program = CLIENT_PROGRAMS.get(scenario.client.program).impl
    return program(scenario, partition_id, state)


def warm_up(context: Context, partition_id: int, num_partitions: int) -> None:
    """What a client's first train call would otherwise pay, done while it tells the server
    its partition: discovery waits up to ``run.node_wait_s``, whereas seconds spent in the
    first round (importing flwr-datasets and partitioning to load the client's data, cached
    per process; torch.optim importing ``torch._dynamo`` when it builds its first optimizer)
    come out of ``run.round_timeout_s``, and a timeout of a few seconds would drop every
    reply of the first rounds. A node whose partitions do not match the scenario's clients
    loads nothing: the server says what is wrong."""
    scenario = scenario_of(context)
    if num_partitions == scenario.data.num_clients:
        client_data(scenario.data, scenario.seed, partition_id)
        importlib.import_module("torch._dynamo")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """By default, tell the server which partition this node serves (node ids are random per
    run), and warm up (:func:`warm_up`); a query naming a ``query`` in its config goes to the
    client program."""
    config = msg.content.config_records.get(CONFIG)
    if config is not None and config.get(QUERY, ""):
        return Message(program_for(context, msg.content).query(msg.content), reply_to=msg)
    partition_id, num_partitions = node_partition(context)
    warm_up(context, partition_id, num_partitions)
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
    program = program_for(context, msg.content)
    reply = program.train(msg.content)
    program.state.save()  # the state this client holds if the server counts the round
    return answer(msg, reply)


@app.evaluate()
@with_faults(client_of)
def evaluate(msg: Message, context: Context) -> Message:
    return answer(msg, program_for(context, msg.content).evaluate(msg.content))
