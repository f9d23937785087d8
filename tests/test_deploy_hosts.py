"""The deployment across separate hosts: the SuperLink and each SuperNode in its own network
namespace with its own address on a virtual bridge, so that traffic crosses interfaces and
the certificate's SAN is the SuperLink's address, not localhost; and what a device may not
do: submit runs, reach the Runtime API or the SuperLink itself, read another node's
messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedsparse.deploy import daemons
from fedsparse.deploy.manifest import Manifest, load_registry
from fedsparse.deploy.programs import CA
from tests import netns
from tests.conftest import REPO

pytestmark = pytest.mark.deployment
FEDSPARSE = str(Path(sys.executable).parent / "fedsparse")
Federation = tuple[Path, dict[str, netns.Host]]


@pytest.fixture(scope="module")
def federation() -> Iterator[Federation]:
    reason = netns.available()
    if reason:
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="fshosts-", dir="/tmp"))
    directory.chmod(0o755)
    with netns.hosts(["link", "node0", "node1"]) as hosts:
        link = hosts["link"]
        subprocess.run([FEDSPARSE, "deploy", "init", str(directory), "--superlink-host",
                        link.address, "--nodes", "2", "--mlflow-backend", "sqlite"],
                       check=True, capture_output=True)
        devices = [device_copy(directory, f"node-{i}") for i in (0, 1)]
        try:
            link.check_call([FEDSPARSE, "deploy", "up", str(directory), "--server"])
            for i, device in enumerate(devices):
                hosts[f"node{i}"].check_call([FEDSPARSE, "deploy", "up", str(device),
                                              "--node", f"node-{i}"])
            yield directory, hosts
        finally:
            for device in devices:
                subprocess.run([FEDSPARSE, "deploy", "down", str(device)], capture_output=True)
                shutil.rmtree(device, ignore_errors=True)
            pids = [d.pid for d in daemons.recorded(directory)]
            started = [p for pid in pids if psutil.pid_exists(pid)
                       for p in [psutil.Process(pid), *psutil.Process(pid).children(True)]]
            subprocess.run([FEDSPARSE, "deploy", "down", str(directory)], capture_output=True)
            _, alive = psutil.wait_procs(started, timeout=30)
            shutil.rmtree(directory, ignore_errors=True)
            assert not alive, f"deploy down left {alive}"


def device_copy(directory: Path, name: str) -> Path:
    """What the README says a device gets: the manifest, the CA and its own node folder."""
    device = Path(tempfile.mkdtemp(prefix=f"fshosts-{name}-", dir="/tmp"))
    for part in ("deployment.toml", "ca/ca.crt", f"nodes/{name}"):
        (device / part).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (directory / part).is_dir() else shutil.copy2
        copy(directory / part, device / part)
    return device


def _status(directory: Path, link: netns.Host) -> str:
    return subprocess.run(link.argv([FEDSPARSE, "deploy", "status", str(directory)]),
                          capture_output=True, text=True, timeout=60).stdout


def test_a_federation_across_hosts_runs_the_quickstart(federation: Federation, tmp_path: Path):
    directory, hosts = federation
    link = hosts["link"]
    manifest = Manifest.load(directory)
    assert manifest.fleet_address == f"{link.address}:8000"  # nodes dial the SAN'd address
    deadline = time.monotonic() + 90
    while _status(directory, link).count(": online") < 2:
        assert time.monotonic() < deadline, _status(directory, link)
        time.sleep(1)
    summary = tmp_path / "summary.json"
    done = subprocess.run(link.argv([
        FEDSPARSE, "run", str(REPO / "scenarios/quickstart.toml"), "--deployment",
        str(directory), "--set", "run.rounds=2", "--set", "run.eval_every=2",
        "--summary", str(summary), "--quiet"]), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["rounds"] == 2 and result["final_accuracy"] > 0.8


def test_a_device_can_neither_submit_nor_read_another_nodes_messages(federation: Federation):
    directory, hosts = federation
    link, node0 = hosts["link"], hosts["node0"]
    manifest = Manifest.load(directory)
    fleet = f"https://{link.address}:{manifest.port}"
    ca = str(directory / CA)

    def post(url: str) -> str:
        code = ("import httpx,sys\ntry:\n print(httpx.post(sys.argv[1], content=b'', "
                "verify=sys.argv[2], timeout=10).status_code)\nexcept httpx.HTTPError as e:"
                "\n print(type(e).__name__)")
        return subprocess.run(node0.argv([sys.executable, "-c", code, url, ca]),
                              capture_output=True, text=True, timeout=60).stdout.strip()

    assert post(f"{fleet}/v1/control/start-run") == "404"
    assert post(f"{fleet}/v1/control/list-runs") == "404"
    assert post(f"{fleet}/v1/runtime/pull-messages") == "404"
    assert post(f"https://{link.address}:{manifest.control_port}/v1/control/start-run") \
        == "ConnectError"  # the SuperLink itself listens on the link host's loopback only
    ids = {n.name: i for i, n in load_registry(directory).items()}

    def pull_as_node0(node_id: int) -> str:
        return subprocess.run(node0.argv([
            sys.executable, "-m", "tests.fleet_probe", fleet, ca,
            str(directory / manifest.node("node-0").key), str(node_id)]),
            capture_output=True, text=True, timeout=60, cwd=REPO).stdout.strip()

    assert pull_as_node0(ids["node-0"]) == "200"  # its own messages: allowed
    assert pull_as_node0(ids["node-1"]) == "401"  # another node's: refused
