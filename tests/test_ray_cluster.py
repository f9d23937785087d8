"""A simulation on an existing Ray cluster (``run.ray_address``, ``$RAY_ADDRESS``).

Fast: the address forms and their precedence, ``run.num_cpus`` refused on a cluster, what the
launcher gives Flower and Ray (no CPU count, no loopback pinning, no local temp dir), and a
ClientApp on a node that does not see the run's client state folder refusing to serve.

Slow: a real 2-node cluster, a head and a worker started as separate ``ray start`` processes
(one CPU each), each in a network namespace of its own (``tests/netns.py``: each reaches the
other only at its bridge address, so nothing can lean on 127.0.0.1), ``fedsparse run`` in
the head's. A stateful run (SCAFFOLD keeps each client's control variate in the run folder)
trains clients on both nodes and ends with the metrics, client rows and weights of the same
scenario on one host, bit for bit; a run whose folder the worker does not see (a tmpfs over
it in the worker's mount namespace) records the worker's clients as failed, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from safetensors.numpy import load_file

from clients import client_app
from fedsparse.client_state import StateUnreachable, shared_root
from fedsparse.launch import _federation_config, stop_tree
from fedsparse.runtime_env import LOCAL_RAY, process_env
from fedsparse.scenario import ScenarioError, parse_scenario
from fedsparse.tracking.history import read_csv
from strategies.server_app import initial_arrays
from tests import netns
from tests.conftest import digits_scenario

BIN = Path(sys.executable).parent
HEAD_PORT = 6379  # Ray's default GCS port: free in a fresh namespace
TIMING = {"round_s", "train_s"}
# SCAFFOLD over every client every round: each client's control variate is saved by
# whichever node trained it and read by whichever node trains it next
SCAFFOLD = digits_scenario(strategy={"name": "scaffold", "fraction_train": 1.0},
                           run={"rounds": 3, "eval_every": 3}).replace(
    'program = "sgd"', 'program = "controlled_sgd"').replace("local_epochs = 3", "local_steps = 4")


@pytest.mark.parametrize(("address", "problem"), [
    ("ray://10.0.0.5:10001", "ray://... is not a cluster address fedsparse can join (ray:// "
                             "is Ray Client"),
    ("http://10.0.0.5:8265", "http://... is not a cluster address"),
    ("10.0.0.5", "expected HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379) or 'auto'"),
    ("10.0.0.5:80", "port 80: Ray's ports are 1024-65535"),
    ("head node:6379", "expected HOST:PORT"),
])
def test_a_ray_address_is_host_port_or_auto(address, problem):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(digits_scenario(run={"ray_address": address}))
    [line] = info.value.problems
    assert line.startswith(f"run.ray_address = {address!r}: {problem}"), line
    for good in ("auto", "10.0.0.5:6379", "head.ray.svc.cluster.local:6379", "[fd00::5]:6379"):
        assert parse_scenario(digits_scenario(run={"ray_address": good})).run.ray_address == good


def test_num_cpus_cannot_apply_on_a_cluster():
    with pytest.raises(ScenarioError) as info:
        parse_scenario(digits_scenario(run={"ray_address": "10.0.0.5:6379", "num_cpus": 4}))
    assert info.value.problems == [
        "run: run.num_cpus = 4 cannot apply with run.ray_address: on a Ray cluster the CPUs "
        "are those each node was started with (ray start --num-cpus); remove run.num_cpus "
        "(--unset run.num_cpus)"]
    run = parse_scenario(digits_scenario(run={"num_cpus": 4})).run
    with pytest.raises(ScenarioError, match=r"^invalid scenario for RAY_ADDRESS=10.0.0.5:6379:\n"
                                            r"  - run.num_cpus = 4 cannot apply with "
                                            r"RAY_ADDRESS: "):
        run.ray_cluster({"RAY_ADDRESS": "10.0.0.5:6379"})
    assert run.ray_cluster({}) == ""  # no cluster: the run's own Ray, with 4 CPUs


def test_the_key_wins_over_ray_address_and_a_bad_ray_address_is_named():
    keyed = parse_scenario(digits_scenario(run={"ray_address": "10.0.0.5:6379"})).run
    assert keyed.ray_cluster({"RAY_ADDRESS": "10.9.9.9:6379"}) == "10.0.0.5:6379"
    plain = parse_scenario(digits_scenario()).run
    assert plain.ray_cluster({"RAY_ADDRESS": "10.9.9.9:6379"}) == "10.9.9.9:6379"
    assert plain.ray_cluster({"RAY_ADDRESS": ""}) == plain.ray_cluster({}) == ""
    with pytest.raises(ScenarioError, match=r"RAY_ADDRESS = 'http://h:8265': http://\.\.\. is "
                                            r"not a cluster address"):
        plain.ray_cluster({"RAY_ADDRESS": "http://h:8265"})


def test_on_a_cluster_flower_gets_no_cpu_count_and_ray_no_loopback_or_temp_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    scenario = parse_scenario(digits_scenario(run={"client_cpus": 2}))
    own = dict(item.split("=", 1) for item in _federation_config(scenario, "").split())
    joined = dict(item.split("=", 1) for item in _federation_config(scenario, "h:6379").split())
    assert own.pop("init-args-num-cpus") == str(os.cpu_count())
    assert joined == own and joined["client-resources-num-cpus"] == "2"
    local, cluster = process_env(tmp_path), process_env(tmp_path, "h:6379")
    assert LOCAL_RAY.items() <= local.items() and "RAY_TMPDIR" in local
    assert "RAY_ADDRESS" not in local
    assert cluster["RAY_ADDRESS"] == "h:6379"
    assert not set(LOCAL_RAY) & set(cluster) and "RAY_TMPDIR" not in cluster
    # what every fedsparse process forces does not pin Ray either (ray start --address
    # refuses to add a node under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
    assert not set(LOCAL_RAY) & set(os.environ)


def test_a_node_that_does_not_see_the_client_state_folder_refuses_to_serve(
        tmp_path: Path, flower_task):
    import socket

    folder = tmp_path / "run" / "client-state"
    scenario = parse_scenario(SCAFFOLD)
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={
        "scenario": scenario.to_toml(), "client-state-dir": str(folder),
        "fedsparse-run-id": "blind"}, node_config={"partition-id": 0, "num-partitions": 6})
    arrays = initial_arrays(scenario)
    control = Array(np.zeros(sum(a.numpy().size for a in arrays.values()), np.float32))
    instruction = Message(RecordDict({"arrays": arrays, "control": ArrayRecord({"c": control}),
                                      "config": ConfigRecord({"server-round": 1,
                                                              "commit-round": 0,
                                                              "partition-id": 0})}),
                          dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(StateUnreachable, match=f"^client state folder {folder} does not exist on "
                                               f"host {socket.gethostname()}: fedsparse run "):
        client_app.train(instruction, context)
    assert not folder.exists()  # it kept nothing there that the other nodes would never read
    folder.mkdir(parents=True)  # what fedsparse run does before any client runs
    reply = client_app.train(instruction, context)
    assert not reply.has_error() and (folder / "blind" / "0").is_dir()
    assert shared_root("") == ""  # no run folder: the node's own (deployment)


# -- a real cluster ---------------------------------------------------------------------------

@dataclass
class Cluster:
    head: netns.Host
    worker: netns.Host
    address: str
    temp: Path  # the nodes' temp dirs and logs
    env: dict[str, str]

    def python(self, code: str, timeout: float = 120) -> object:
        """Run ``code`` as a Ray driver on the head; what it prints is JSON."""
        done = subprocess.run(self.head.argv([sys.executable, "-c", code]), env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    def fedsparse(self, workdir: Path, *args: str) -> subprocess.CompletedProcess:
        """``fedsparse ARGS`` on the head, with ``run.ray_address`` at the head."""
        return subprocess.run(self.head.argv([str(BIN / "fedsparse"), *args, "--quiet",
                                              "--set", f"run.ray_address={self.address}"]),
                              cwd=workdir, env=self.env, capture_output=True, text=True,
                              timeout=300)


NODES = """
import json, time, ray
ray.init(logging_level="ERROR")
deadline = time.monotonic() + 60
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps({n["NodeManagerAddress"]: n["Resources"].get("CPU") for n in alive}))
"""
# per node address: how many ClientApp calls (Flower's ClientAppActor.run tasks) it ran, and
# the ClientApp actors still alive (GCS's task events and actor table: Ray's dashboard, which
# its state API needs, is not running)
CALLS = """
import collections, json, ray
from ray.core.generated import gcs_pb2
ray.init(logging_level="ERROR")
address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
calls = collections.Counter()
for raw in ray._private.state.state._connect_and_get_accessor().get_task_events():
    event = gcs_pb2.TaskEvents.FromString(raw)
    if event.task_info.name == "ClientAppActor.run" and event.state_updates.node_id:
        calls[address[event.state_updates.node_id.hex()]] += 1
alive = [a["ActorID"] for a in ray._private.state.actors().values()
         if a["ActorClassName"].endswith("ClientAppActor") and a["State"] != "DEAD"]
print(json.dumps({"calls": calls, "alive": alive}))
"""


def ray_start(temp_dir: Path, *args: str) -> list[str]:
    return [str(BIN / "ray"), "start", "--block", "--num-cpus", "1", "--disable-usage-stats",
            "--object-store-memory", str(100 * 2**20), "--temp-dir", str(temp_dir), *args]


def start_node(started: list[subprocess.Popen], host: netns.Host, argv: list[str], log: Path,
               env: dict[str, str], timeout: float = 90) -> None:
    """Start ``argv`` (a ``ray start --block``) in ``host``, output to ``log``, into
    ``started``; return once Ray says the node runs."""
    with open(log, "w") as out:
        started.append(host.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        assert started[-1].poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


@contextmanager
def ray_cluster(blind: Path) -> Iterator[Cluster]:
    """A head and a worker, each ``ray start --block`` with one CPU in a namespace of its
    own, the worker with a tmpfs over ``blind``; every process of either stopped, and their
    temp dir removed, on exit."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    temp = Path(tempfile.mkdtemp(prefix="fsr-"))  # short: Ray's socket paths live below it
    started: list[subprocess.Popen] = []
    with netns.hosts(["head", "worker"]) as hosts:
        head, worker = hosts["head"], hosts["worker"]
        address = f"{head.address}:{HEAD_PORT}"
        try:
            start_node(started, head, ray_start(
                temp / "h", "--head", "--port", str(HEAD_PORT), "--node-ip-address",
                head.address, "--resources", '{"head": 1}', "--include-dashboard", "false"),
                temp / "head.log", env)
            hide = f"mount -t tmpfs none {blind} && exec \"$@\""
            start_node(started, worker, [
                "unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "sh",
                *ray_start(temp / "w", "--address", address, "--node-ip-address",
                           worker.address)], temp / "worker.log", env)
            yield Cluster(head, worker, address, temp, {**env, "RAY_ADDRESS": address})
        finally:
            for proc in started:
                stop_tree(proc)
            shutil.rmtree(temp, ignore_errors=True)


def left_behind(cluster: Cluster) -> list[str]:
    """Processes of ``cluster`` still running: any in its namespaces or naming its temp dir."""
    named = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
             if str(cluster.temp) in " ".join(p.info["cmdline"] or [])]
    return named + [str(pid) for host in (cluster.head, cluster.worker) for pid in host.pids()]


def deterministic(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_csv(path)]


@pytest.mark.slow
@pytest.mark.simulation
def test_a_run_on_a_two_node_cluster_equals_the_run_on_one_host(workdir: Path):
    if reason := netns.available():
        pytest.skip(reason)
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` command (util-linux)")
    from fedsparse.cli import main

    scenario = workdir / "scaffold.toml"
    scenario.write_text(SCAFFOLD)
    assert main(["run", str(scenario), "--run-dir", "runs/one-host", "--quiet"]) == 0
    (workdir / "blind").mkdir()
    with ray_cluster(workdir / "blind") as cluster:
        head, worker = cluster.head.address, cluster.worker.address
        assert cluster.python(NODES) == {head: 1.0, worker: 1.0}
        done = cluster.fedsparse(workdir, "run", str(scenario), "--run-dir", "runs/cluster")
        assert done.returncode == 0, (done.stderr[-3000:],
                                      (workdir / "runs/cluster/flower.log").read_text()[-3000:])
        seen = cluster.python(CALLS)
        # the worker does not see blind/: the clients it serves fail, saying why
        cluster.fedsparse(workdir, "run", str(scenario), "--run-dir", "blind/run",
                          "--set", "run.rounds=1")
    assert seen["alive"] == []  # the run's actors left with it; the cluster stays
    assert seen["calls"].keys() == {head, worker}, seen  # clients trained on both nodes
    for name in ("metrics.csv", "clients.csv"):
        assert deterministic(workdir / "runs/cluster" / name) == \
            deterministic(workdir / "runs/one-host" / name), name
    final, reference = (load_file(workdir / "runs" / run / "model.safetensors")
                        for run in ("cluster", "one-host"))
    assert final.keys() == reference.keys()
    for key in reference:
        assert final[key].tobytes() == reference[key].tobytes(), key
    blind = [row for row in read_csv(workdir / "blind/run/clients.csv") if row["status"] != "ok"]
    assert blind and all(f"client state folder {workdir / 'blind/run/client-state'} does not "
                         f"exist on host" in row["reason"] for row in blind), blind
    assert not left_behind(cluster) and not cluster.temp.exists()
    assert not netns.namespaces(cluster.head.ns.split("-")[1])
