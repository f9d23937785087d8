"""What a deployment's ServerApp takes from its own folder rather than from a submitted run:
the run folders (confined to ``DIR/runs``), the tracking target, and which node serves which
partition (the registry of registered nodes, not what nodes declare)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedsparse.deploy.manifest import Manifest, Node, save_registry
from fedsparse.deploy.serverside import confine, registered_partitions
from fedsparse.scenario import ScenarioError, load_scenario
from strategies.directory import Declared, DiscoveryError, Registered
from strategies.server_app import build_strategy, initial_arrays
from tests.conftest import REPO
from tests.local_grid import LocalGrid


def test_run_folders_are_confined_to_the_deployments_runs(tmp_path: Path):
    runs = tmp_path / "runs"
    confined = confine({"out-dir": "runs/a", "resume-from": str(runs / "a")}, tmp_path)
    assert confined == {"out-dir": str(runs / "a"), "resume-from": str(runs / "a")}
    for bad in ("/etc/cron.d/x", "runs/../state", str(runs), "../elsewhere/runs/a", "state/x"):
        with pytest.raises(ScenarioError, match="outside this deployment's run folders"):
            confine({"out-dir": bad}, tmp_path)
    with pytest.raises(ScenarioError, match="out-dir is empty"):
        confine({"out-dir": ""}, tmp_path)


@pytest.mark.parametrize("key", ["tracking-uri", "artifact-location", "client-state-dir"])
def test_a_submitted_run_may_not_choose_tracking_or_device_folders(tmp_path: Path, key: str):
    with pytest.raises(ScenarioError, match=f"{key} = 'x': set by the deployment"):
        confine({"out-dir": "runs/a", key: "x"}, tmp_path)


def _grid(num_nodes: int, num_clients: int) -> tuple[LocalGrid, object]:
    scenario = load_scenario(REPO / "scenarios/quickstart.toml",
                             [f"data.num_clients={num_clients}"])
    return LocalGrid(num_nodes, {"scenario": scenario.to_toml(),
                                 "federation": "deployment"}), scenario


def test_an_unregistered_node_claiming_a_partition_is_ignored(flower_task: None):
    grid, scenario = _grid(3, 2)
    for context in grid.contexts.values():
        context.node_config["num-partitions"] = 2
    grid.contexts[1002].node_config["partition-id"] = 0  # a stranger claims partition 0
    with pytest.raises(DiscoveryError, match="two nodes serve partition-id=0"):
        Declared(scenario).start(grid)  # trusting what nodes declare, the run cannot start
    grid.sent.clear()
    registered = Registered(scenario, {1000: 0, 1001: 1})
    registered.start(grid)
    assert registered.nodes() == {0: 1000, 1: 1001}
    assert grid.sent == []  # nobody is asked


def test_a_registered_node_refuses_an_instruction_for_another_partition(flower_task: None):
    grid, scenario = _grid(2, 2)
    strategy = build_strategy(scenario)
    strategy.bind(Registered(scenario, {1000: 1, 1001: 0}))  # the nodes say 0 and 1
    messages = list(strategy.configure_evaluate(1, initial_arrays(scenario), ConfigRecord(),
                                                grid))
    metrics = strategy.aggregate_evaluate(1, grid.pull_messages(grid.push_messages(messages)))
    assert metrics["eval_clients_failed"] == 2
    reasons = [r.reason for r in sorted(strategy.client_records, key=lambda r: r.partition_id)]
    assert "this node serves partition-id=1, not the partition-id=0" in reasons[0]
    assert "this node serves partition-id=0, not the partition-id=1" in reasons[1]


def test_a_registry_must_cover_the_scenarios_clients(tmp_path: Path, flower_task: None):
    _, scenario = _grid(2, 2)
    with pytest.raises(DiscoveryError, match=r"no node is registered for partition ids \[1\]"):
        Registered(scenario, {1000: 0})
    Manifest(superlink_hosts=["h"], nodes=[Node("node-0", 0)], insecure=True).save(tmp_path)
    assert registered_partitions(tmp_path) is None  # no node auth: nodes say their partition
    Manifest(superlink_hosts=["h"], nodes=[Node("node-0", 0)]).save(tmp_path)
    assert registered_partitions(tmp_path) == {}  # a lost registry serves nothing, not all
    save_registry(tmp_path, {7: Node("node-0", 0), 9: Node("node-1", 1)})
    assert registered_partitions(tmp_path) == {7: 0, 9: 1}
