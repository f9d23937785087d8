"""The same ClientApp on Flower's Deployment Engine: a SuperLink and two SuperNodes as local
processes on 127.0.0.1, the quickstart submitted to them for 2 rounds."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from fedsparse.cli import main
from fedsparse.launch import LocalDeployment
from fedsparse.tracking.history import read_csv
from tests.conftest import REPO

pytestmark = pytest.mark.deployment


def test_quickstart_through_a_superlink_and_two_supernodes(workdir: Path):
    deployment = LocalDeployment(num_nodes=2, workdir=workdir)
    with deployment:
        started = [psutil.Process(p.pid) for p in deployment.processes]
        assert len(started) == 3  # SuperLink + 2 SuperNodes
        code = main(["run", str(REPO / "scenarios/quickstart.toml"),
                     "--superlink", deployment.address, "--set", "data.num_clients=2",
                     "--set", "run.rounds=2", "--set", "run.eval_every=2",
                     "--run-dir", "runs/deploy",
                     "--summary", "deploy.json", "--quiet"])
        assert code == 0
        started += [c for p in started for c in p.children(recursive=True)]
    summary = json.loads((workdir / "deploy.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] > 0.8
    clients = read_csv(workdir / "runs/deploy/clients.csv")
    # each SuperNode found its own partition: both answered federated evaluation
    assert sorted(c["partition_id"] for c in clients if c["phase"] == "evaluate") == [0, 1]
    assert all(c["status"] == "ok" for c in clients)
    # every process the test started (and their SuperExec/ClientApp children) is gone
    for proc in started:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
