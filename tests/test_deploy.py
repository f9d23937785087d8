"""``fedsparse deploy`` on this machine: TLS, node authentication, MLflow on PostgreSQL with
basic auth, services that outlive the command that started them, the quickstart through it,
and the nodes that must be refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from fedsparse.cli import main
from fedsparse.deploy import daemons, flower_cli, pki
from fedsparse.deploy.manifest import Manifest, load_registry
from fedsparse.deploy.programs import CA, program
from fedsparse.launch import free_port
from fedsparse.tracking.history import read_csv
from tests.conftest import REPO

pytestmark = pytest.mark.deployment
FEDSPARSE = str(Path(sys.executable).parent / "fedsparse")
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin/postgres")


def fedsparse(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([FEDSPARSE, *args], capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"fedsparse {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def tree(pid: int) -> list[psutil.Process]:
    with_children = psutil.Process(pid)
    return [with_children, *with_children.children(recursive=True)]


def online(directory: Path, manifest: Manifest) -> set[str]:
    """Names of the registered nodes the SuperLink sees online."""
    names = {i: n.name for i, n in load_registry(directory).items()}
    return {names[i] for i, state in flower_cli.listed(directory, manifest).items()
            if state == "online" and i in names}


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Path]:
    """A TLS + node-auth deployment of two nodes on 127.0.0.1 (free ports), MLflow on a
    PostgreSQL that ``deploy up`` starts; every process it made is gone afterwards."""
    if not POSTGRES_BIN.exists():
        pytest.skip("PostgreSQL 15 is not installed (apt-get install postgresql)")
    directory = Path(tempfile.mkdtemp(prefix="fsdeploy-", dir="/tmp"))
    directory.chmod(0o755)  # PostgreSQL's unprivileged user must reach its data folder
    fedsparse("deploy", "init", str(directory), "--superlink-host", "127.0.0.1",
              "--nodes", "2", "--port", str(free_port()))
    manifest = Manifest.load(directory)
    manifest.control_port, manifest.mlflow_port = free_port(), free_port()
    manifest.postgres_port = free_port()
    for node in manifest.nodes:
        node.runtime_port = free_port()
    manifest.save(directory)
    pids: list[int] = []
    try:
        fedsparse("deploy", "up", str(directory))
        pids = [d.pid for d in daemons.recorded(directory)]
        yield directory
    finally:
        started = [p for pid in pids if psutil.pid_exists(pid) for p in tree(pid)]
        fedsparse("deploy", "down", str(directory), check=False)
        _gone, alive = psutil.wait_procs(started, timeout=30)
        for proc in alive:
            proc.kill()
        shutil.rmtree(directory, ignore_errors=True)
        assert not alive, f"deploy down left {alive}"


def test_services_outlive_the_command_that_started_them(deployment: Path):
    manifest = Manifest.load(deployment)
    expected = ["postgres", "mlflow", "superlink", "fleet-proxy", "node:node-0", "node:node-1"]
    recorded = {d.name: d for d in daemons.recorded(deployment)}
    assert sorted(recorded) == sorted(expected)
    for name in expected:
        daemon = recorded[name]
        proc = daemon.process()
        assert proc is not None, f"{name} is not running after `deploy up` exited"
        assert daemon.argv == program(deployment, manifest, name).argv  # one source of flags
        (child,) = proc.children()  # the supervisor runs exactly the recorded program
        assert child.cmdline()[-len(daemon.argv[1:]):] == daemon.argv[1:]
    link = " ".join(recorded["superlink"].argv)
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert f"127.0.0.1 --port {manifest.control_port}" in link  # loopback only
    wait_for(lambda: online(deployment, manifest) == {"node-0", "node-1"}, 60, "both nodes")
    status = fedsparse("deploy", "status", str(deployment)).stdout
    assert status.count("running") == 6 and status.count(": online") == 2, status


def test_quickstart_through_the_deployment_reaches_its_mlflow(deployment: Path,
                                                               workdir: Path):
    from fedsparse.deploy.mlflow_service import tracking_env

    rogue = _rogue_nodes(deployment, workdir)
    code = main(["run", str(REPO / "scenarios/quickstart.toml"), "--deployment",
                 str(deployment), "--set", "run.rounds=2", "--set", "run.eval_every=2",
                 "--summary", "deploy.json", "--quiet"])
    assert code == 0
    summary = json.loads((workdir / "deploy.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] > 0.8
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == deployment / "runs"  # the run folder lives on the SuperLink host
    clients = read_csv(run_dir / "clients.csv")
    assert sorted({c["partition_id"] for c in clients}) == [0, 1]
    assert all(c["status"] == "ok" for c in clients)
    # the refused nodes: an unregistered key, plaintext, a SuperLink they cannot trust
    for name, (proc, log, refusal) in rogue.items():
        os.killpg(proc.pid, signal.SIGKILL)  # Flower's SuperNode logs its exit, then lingers
        proc.wait(10)
        assert refusal in log.read_text(errors="replace"), f"the {name} node was not refused"
    # MLflow received it, authenticated; anonymous requests are refused
    env = tracking_env(deployment, Manifest.load(deployment))
    from mlflow.tracking import MlflowClient

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [2]
        assert "scenario.toml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    # a deployed run resumes from its checkpoint on the SuperLink host, into the same MLflow run
    assert main(["run", "--resume", str(run_dir), "--deployment", str(deployment),
                 "--set", "run.rounds=3", "--summary", "resumed.json", "--quiet"]) == 0
    resumed = json.loads((workdir / "resumed.json").read_text())
    assert resumed["rounds"] == 3 and resumed["mlflow_run_id"] == summary["mlflow_run_id"]
    url = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}"
    context = daemons.ssl_context(deployment) if url.startswith("https") else None
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10, context=context)
    assert refused.value.code == 401


Rogue = tuple[subprocess.Popen, Path, str]


def _rogue_nodes(deployment: Path, workdir: Path) -> dict[str, Rogue]:
    """Three SuperNodes that must not get in, each with the refusal it must log: a key that
    was never registered, plaintext, and one that trusts another CA; all claim partition 0."""
    manifest = Manifest.load(deployment)
    private, _public = pki.make_node_key()
    pki.write_private(workdir / "rogue.key", private)
    _other_key, other_ca = pki.make_ca("another CA")
    (workdir / "other-ca.crt").write_bytes(pki.cert_pem(other_ca))
    own_key = str(deployment / manifest.nodes[0].key)
    variants = {
        "unregistered": (["--root-certificates", str(deployment / CA),
                          "--auth-supernode-private-key", str(workdir / "rogue.key")],
                         "Failed to activate SuperNode"),
        "plaintext": (["--insecure"], "Failed to initialize the connection to the SuperLink"),
        "other-CA": (["--root-certificates", str(workdir / "other-ca.crt"),
                      "--auth-supernode-private-key", own_key], "CERTIFICATE_VERIFY_FAILED"),
    }
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    rogues = {}
    for name, (flags, refusal) in variants.items():
        env["FLWR_HOME"] = str(workdir / f"rogue-{name}")
        log = workdir / f"rogue-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(bin_dir / "flower-supernode"), "--superlink", manifest.fleet_address,
                 "--max-retries", "1", "--max-wait-time", "30", "--port", str(free_port()),
                 "--node-config", f"partition-id=0 num-partitions={manifest.num_partitions}",
                 *flags], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        rogues[name] = (proc, log, refusal)
    return rogues


def test_a_misaddressed_submission_says_why(deployment: Path, workdir: Path,
                                            capsys: pytest.CaptureFixture[str]):
    manifest = Manifest.load(deployment)
    _other_key, other_ca = pki.make_ca("another CA")
    (workdir / "other.crt").write_bytes(pki.cert_pem(other_ca))
    quickstart = str(REPO / "scenarios/quickstart.toml")
    cases = [
        (f"127.0.0.1:{free_port()}", None, "is unreachable"),
        (manifest.control_address, None, "speaks TLS: pass --root-certificates"),
        (manifest.control_address, workdir / "other.crt", "is not the one"),
        (manifest.control_address, workdir / "missing.crt", "no such file"),
    ]
    for address, ca, message in cases:
        args = ["run", quickstart, "--superlink", address]
        args += ["--root-certificates", str(ca)] if ca else []
        assert main(args) == 1
        err = capsys.readouterr().err
        assert message in err and "starting SuperLink, Ray" not in err, err


def test_add_and_remove_a_node(deployment: Path):
    manifest = Manifest.load(deployment)
    out = fedsparse("deploy", "add-node", str(deployment)).stdout
    assert "node-2 serves partition 2" in out and "registered as node" in out
    fedsparse("deploy", "up", str(deployment), "--node", "node-2")
    manifest = Manifest.load(deployment)
    wait_for(lambda: "node-2" in online(deployment, manifest), 60, "node-2 online")
    (node_id,) = [i for i, n in load_registry(deployment).items() if n.name == "node-2"]
    fedsparse("deploy", "remove-node", str(deployment), "node-2")
    manifest = Manifest.load(deployment)
    assert [n.name for n in manifest.nodes] == ["node-0", "node-1"]
    assert node_id not in load_registry(deployment)
    assert daemons.find(deployment, "node:node-2") is None
    assert flower_cli.listed(deployment, manifest).get(node_id) in (None, "unregistered")
