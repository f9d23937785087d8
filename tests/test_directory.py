"""Which node serves which partition, found without a round trip per client
(``strategies/directory.py``), and a round's work bounded by the clients it samples."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients import client_app
from fedsparse.scenario import parse_scenario
from strategies.directory import Assigned, Declared
from strategies.records import to_numpy
from strategies.server_app import build_strategy, initial_arrays
from tests.conftest import digits_scenario
from tests.local_grid import LocalGrid, run_federation

pytestmark = pytest.mark.usefixtures("flower_task")


def test_simulation_start_up_asks_one_client_per_actor_whatever_the_clients():
    scenario = parse_scenario(digits_scenario(data={"num_clients": 40}))
    ids = [int(i) for i in np.random.default_rng(1).choice(2**40, 40, replace=False)]
    grid = LocalGrid(40, {"scenario": scenario.to_toml()}, node_ids=ids)
    directory = Assigned(scenario, actors=2)
    directory.start(grid)
    assert directory.nodes() == dict(enumerate(sorted(ids)))
    assert [m.metadata.message_type for m in grid.sent] == [MessageType.QUERY] * 2
    assert [m.content["config"]["partition-id"] for m in grid.sent] == [0, 1]


def test_a_simulation_is_the_same_whatever_the_node_ids_and_their_numbering():
    scenario = parse_scenario(digits_scenario(run={"rounds": 3, "eval_every": 3}))
    reference = run_federation(scenario)
    # random node ids whose order differs from the engine's partition numbering
    ids = [int(i) for i in np.random.default_rng(7).permutation(10**6)[:6]]
    other = run_federation(scenario, node_ids=ids)
    assert sorted(ids) != ids
    for key, value in to_numpy(reference.state.arrays).items():
        np.testing.assert_array_equal(to_numpy(other.state.arrays)[key], value)
    def table(f) -> list[dict]:  # every client's row but its wall time
        return [{k: v for k, v in r.row().items() if k != "train_s"} for r in f.records]

    assert table(other) == table(reference)


def test_a_round_keeps_only_its_own_client_records():
    f = run_federation(parse_scenario(digits_scenario(run={"rounds": 3, "eval_every": 1})))
    assert {r.round for r in f.records} == {1, 2, 3}
    assert {r.round for r in f.strategy.client_records} == {3}


def test_a_simulated_client_serves_the_partition_it_is_told_and_needs_one():
    scenario = parse_scenario(digits_scenario())
    context = Context(run_id=1, node_id=5, state=RecordDict(), run_config={
        "scenario": scenario.to_toml()}, node_config={"partition-id": 4, "num-partitions": 6})

    def query(config: dict) -> Message:
        return client_app.query(Message(RecordDict({"config": ConfigRecord(config)}),
                                        dst_node_id=5, message_type=MessageType.QUERY), context)

    assert query({"partition-id": 2}).content["metrics"]["partition-id"] == 2
    for bad in ({}, {"partition-id": 6}, {"partition-id": "2"}):
        with pytest.raises(ValueError, match="a simulated client needs its partition-id"):
            query(bad)


def _declared_grid() -> tuple[LocalGrid, Declared, object]:
    scenario = parse_scenario(digits_scenario(data={"num_clients": 3},
                                              strategy={"fraction_evaluate": 1.0}))
    grid = LocalGrid(3, {"scenario": scenario.to_toml(), "federation": "deployment"})
    directory = Declared(scenario)
    directory.start(grid)
    return grid, directory, scenario


def test_without_node_auth_only_new_nodes_are_asked_and_a_node_may_leave_and_return():
    grid, directory, scenario = _declared_grid()
    assert directory.nodes() == {0: 1000, 1: 1001, 2: 1002}
    grid.sent.clear()
    directory.refresh(grid)
    assert grid.sent == []  # nobody new: nobody asked
    gone = grid.contexts.pop(1001)
    directory.refresh(grid)
    assert directory.node(1) is None
    strategy = build_strategy(scenario)
    strategy.bind(directory)
    messages = strategy.configure_evaluate(1, initial_arrays(scenario), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [1000, 1002]
    metrics = strategy.aggregate_evaluate(1, grid.pull_messages(grid.push_messages(messages)))
    assert metrics["eval_clients_failed"] == 1
    (record,) = [r for r in strategy.client_records if r.partition_id == 1]
    assert (record.status, record.reason) == ("unavailable", "no connected node serves it")
    gone.node_id = 2001
    grid.contexts[2001] = gone  # it comes back with a new node id
    grid.sent.clear()
    directory.refresh(grid)
    assert [m.metadata.dst_node_id for m in grid.sent] == [2001]
    assert directory.node(1) == 2001


def test_a_newcomer_claiming_a_served_partition_is_ignored():
    grid, directory, _ = _declared_grid()
    stranger = Context(run_id=1, node_id=3000, state=RecordDict(),
                       run_config=grid.contexts[1000].run_config,
                       node_config={"partition-id": 0, "num-partitions": 3})
    grid.contexts[3000] = stranger
    directory.refresh(grid)
    assert directory.node(0) == 1000 and directory.partition(3000) is None
