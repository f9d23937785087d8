"""Services owned by a deployment folder: they outlive the process that started them, stop
with everything they started, are not confused with a recycled pid, and one command at a
time changes them; and the flags each service gets from the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedsparse.deploy import daemons
from fedsparse.deploy.init import init_deployment
from fedsparse.deploy.manifest import DeploymentError, Manifest
from fedsparse.deploy.programs import Program, program

SPAWNER = ("import subprocess, sys, time\n"
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
           " start_new_session=True)\n"
           "time.sleep(600)\n")


def test_a_service_outlives_its_starter_and_stops_with_all_it_started(tmp_path: Path):
    prog = Program("sleeper", [sys.executable, "-c", SPAWNER])
    starter = (f"from pathlib import Path\nfrom fedsparse.deploy import daemons\n"
               f"from fedsparse.deploy.programs import Program\nimport sys\n"
               f"daemons.start(Path({str(tmp_path)!r}), Program('sleeper', "
               f"{prog.argv!r}), {{}})\n")
    subprocess.run([sys.executable, "-c", starter], check=True, timeout=60)  # it has exited
    daemon = daemons.find(tmp_path, "sleeper")
    assert daemon is not None and daemon.argv == prog.argv
    supervisor = daemon.process()
    assert supervisor is not None
    deadline = time.monotonic() + 10
    while len(supervisor.children(recursive=True)) < 2:  # the program and its own daemon
        assert time.monotonic() < deadline
        time.sleep(0.1)
    tree = [supervisor, *supervisor.children(recursive=True)]
    assert daemons.stop(tmp_path, "sleeper")
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive  # the grandchild in its own session too
    assert daemons.find(tmp_path, "sleeper") is None and not daemons.stop(tmp_path, "sleeper")


def test_a_service_whose_supervisor_was_killed_is_still_stopped(tmp_path: Path):
    daemon = daemons.start(tmp_path, Program("orphan", [sys.executable, "-c", SPAWNER]), {})
    supervisor = daemon.process()
    deadline = time.monotonic() + 10
    while len(supervisor.children(recursive=True)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    orphans = supervisor.children(recursive=True)
    supervisor.kill()  # SIGKILL: it cannot stop its tree
    supervisor.wait(5)
    assert all(p.is_running() for p in orphans)
    assert daemons.stop(tmp_path, "orphan")
    _, alive = psutil.wait_procs(orphans, timeout=10)
    assert not alive


def test_a_recycled_pid_is_not_the_service(tmp_path: Path):
    daemons.run_dir(tmp_path).mkdir(parents=True)
    me = psutil.Process()  # alive, but started at another time than the record says
    record = {"name": "x", "pid": me.pid, "started": me.create_time() - 100.0,
              "argv": ["x"], "log": ""}
    (daemons.run_dir(tmp_path) / "x.json").write_text(json.dumps(record))
    assert daemons.find(tmp_path, "x").process() is None
    assert not daemons.stop(tmp_path, "x")  # and it is not signalled
    assert me.is_running()


def test_one_command_at_a_time(tmp_path: Path):
    with daemons.locked(tmp_path), pytest.raises(DeploymentError, match="in use by another"), \
            daemons.locked(tmp_path):
        pass


def test_a_service_that_exits_at_start_says_why(tmp_path: Path):
    prog = Program("broken", [sys.executable, "-c", "import sys; print('no config'); "
                              "sys.exit(3)"], health_url="http://127.0.0.1:9/health")
    with pytest.raises(DeploymentError, match=r"broken exited at start \(code 3\)"
                                              r"(.|\n)*no config"):
        daemons.start(tmp_path, prog, {}, timeout=20)
    assert daemons.find(tmp_path, "broken") is None


@pytest.mark.parametrize("insecure", [False, True])
def test_transport_flags_follow_the_manifest(tmp_path: Path, insecure: bool):
    init_deployment(tmp_path, ["192.0.2.10"], 2, insecure=insecure,
                    mlflow_backend="sqlite")
    manifest = Manifest.load(tmp_path)
    link = program(tmp_path, manifest, "superlink").argv
    node = program(tmp_path, manifest, "node:node-1").argv
    proxy = program(tmp_path, manifest, "fleet-proxy").argv
    assert link[link.index("--host") + 1] == "127.0.0.1"  # never the devices' side
    assert node[node.index("--superlink") + 1] == "192.0.2.10:8000"
    assert "partition-id=1 num-partitions=2" in node[node.index("--node-config") + 1]
    if insecure:
        assert "--insecure" in link and "--insecure" in node
        assert "--enable-supernode-auth" not in link and "--certfile" not in proxy
    else:
        assert "--insecure" not in link + node
        assert "--enable-supernode-auth" in link and "--ssl-certfile" in link
        assert node[node.index("--auth-supernode-private-key") + 1] == \
            str(tmp_path / "nodes/node-1/node.key")
        assert "--certfile" in proxy
