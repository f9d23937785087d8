"""Which node serves which partition, found without a round trip per client
(``strategies/directory.py``), and a round's work bounded by the clients it samples."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest
import tomli_w
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients import client_app
from fedsparse.scenario import Scenario, parse_scenario
from strategies.directory import Assigned, Declared
from strategies.records import to_numpy
from strategies.server_app import build_strategy, initial_arrays
from tests.conftest import DATA, digits_scenario
from tests.local_grid import LocalGrid, run_federation

pytestmark = pytest.mark.usefixtures("flower_task")


def sampled_tenth() -> Scenario:
    """40 clients of which a round trains and evaluates 4."""
    return parse_scenario(digits_scenario(
        data={"num_clients": 40}, run={"num_cpus": 2, "node_wait_s": 5},
        strategy={"fraction_train": 0.1, "fraction_evaluate": 0.1}))


def test_a_simulation_runs_as_many_nodes_as_a_round_contacts_at_once():
    def nodes(num_cpus: int = 2, **strategy) -> int:
        return parse_scenario(digits_scenario(data={"num_clients": 40}, run={
            "num_cpus": num_cpus}, strategy=strategy)).simulated_nodes()

    assert nodes(fraction_train=0.1, fraction_evaluate=0.0) == 4
    assert nodes(fraction_train=0.1, fraction_evaluate=0.25) == 10  # evaluation samples more
    assert nodes(fraction_train=0.02, fraction_evaluate=0.0, min_train_clients=3) == 3
    assert nodes(num_cpus=6, fraction_train=0.1, fraction_evaluate=0.0) == 6  # one per actor
    assert nodes(fraction_train=1.0) == 40  # never more than the clients
    tree = tomllib.loads((DATA / "pfedgate_digits.toml").read_text())
    tree["strategy"] |= {"novel_clients": 4, "fraction_train": 0.2, "fraction_evaluate": 0.0}
    tree.setdefault("run", {})["num_cpus"] = 1
    # pFedGate's novel clients are all asked at once, after the last round
    assert parse_scenario(tomli_w.dumps(tree)).simulated_nodes() == 4


def test_simulation_start_up_asks_one_client_per_actor_whatever_the_clients():
    scenario = sampled_tenth()
    ids = [int(i) for i in np.random.default_rng(1).choice(2**40, 4, replace=False)]
    grid = LocalGrid(4, {"scenario": scenario.to_toml()}, node_ids=ids)
    directory = Assigned(scenario, actors=2)
    directory.start(grid)
    assert [m.metadata.message_type for m in grid.sent] == [MessageType.QUERY] * 2
    assert [m.content["config"]["partition-id"] for m in grid.sent] == [0, 1]
    assert len({m.metadata.dst_node_id for m in grid.sent}) == 2


def test_an_exchange_goes_to_distinct_simulated_nodes_that_serve_other_partitions_next():
    scenario = sampled_tenth()
    grid = LocalGrid(scenario.simulated_nodes(), {"scenario": scenario.to_toml()})
    strategy = build_strategy(scenario)
    strategy.bind(Assigned(scenario, actors=1))
    strategy.bound.start(grid)
    served: dict[int, set[int]] = {}
    for server_round in (1, 2, 3):
        strategy.begin_round(server_round, grid)
        messages = list(strategy.configure_train(server_round, initial_arrays(scenario),
                                                 ConfigRecord(), grid))
        assert len({m.metadata.dst_node_id for m in messages}) == len(messages) == 4
        for m in messages:
            served.setdefault(m.metadata.dst_node_id, set()).add(LocalGrid.partition_of(m))
        _, metrics = strategy.aggregate_train(
            server_round, grid.pull_messages(grid.push_messages(messages)))
        assert metrics["clients_ok"] == 4
        assert sorted(r.partition_id for r in strategy.client_records) == \
            strategy.sample(server_round, "train")
    assert any(len(partitions) > 1 for partitions in served.values())


def test_a_simulated_reply_counts_for_its_instruction_this_round_from_the_node_asked():
    scenario = parse_scenario(digits_scenario(run={"num_cpus": 2}))
    grid = LocalGrid(scenario.simulated_nodes(), {"scenario": scenario.to_toml()})
    directory = Assigned(scenario, actors=1)
    directory.start(grid)
    directory.begin_round(grid)
    asked = directory.message(4, RecordDict(), MessageType.QUERY)
    (reply,) = grid.pull_messages(grid.push_messages([asked]))
    assert directory.sender(reply) == 4
    other = next(n for n in grid.get_node_ids() if n != asked.metadata.dst_node_id)
    forged = Message(RecordDict(), reply_to=asked)
    forged.metadata.__dict__["_src_node_id"] = other
    assert directory.sender(forged) is None  # from another node than the one asked
    unasked = Message(RecordDict(), dst_node_id=asked.metadata.dst_node_id,
                      message_type=MessageType.QUERY)
    grid.push_messages([unasked])
    assert directory.sender(Message(RecordDict(), reply_to=unasked)) is None
    directory.begin_round(grid)
    assert directory.sender(reply) is None  # a reply to the round before


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
