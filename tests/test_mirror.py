"""MLflow off the critical path: a real `mlflow server` on 127.0.0.1 that goes away mid-run and
comes back, one that is not there at all, and `fedsparse sync`: every round reaches MLflow
exactly once, training never waits for it, nothing is lost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedsparse.cli import main
from fedsparse.launch import free_port
from fedsparse.tracking.history import read_csv
from fedsparse.tracking.mirror import ROUND_MARKER, TrackedRun, unreachable
from fedsparse.tracking.system_metrics import read_samples
from strategies import server_app
from tests.conftest import digits_scenario
from tests.local_grid import serve
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.usefixtures("flower_task")

ROUNDS = 8
TEXT = digits_scenario(run={"rounds": ROUNDS, "eval_every": 2}, tracking={
    "experiment": "mirror", "flush_timeout_s": 60.0})


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def assert_every_round_once(server: MlflowServer, run_id: str) -> None:
    for key in ("eval/accuracy", "comm/uplink_MB", ROUND_MARKER):
        steps = [m.step for m in client(server).get_metric_history(run_id, key)]
        expected = list(range(2, ROUNDS + 1, 2)) if key == "eval/accuracy" else \
            list(range(1, ROUNDS + 1))
        assert sorted(steps) == expected, key


@pytest.mark.slow
def test_a_server_that_dies_mid_run_and_comes_back_gets_every_round_once(
        tmp_path, mlflow_server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow_server.start()
    original = server_app.BackgroundMirror.round_done

    def round_done(self, server_round):  # the server goes away after round 2, back after 5
        original(self, server_round)
        if server_round == 2:
            mlflow_server.stop()
        elif server_round == 5:
            mlflow_server.start()

    monkeypatch.setattr(server_app.BackgroundMirror, "round_done", round_done)
    serve(TEXT, tmp_path / "run", tmp_path, tracking_uri=mlflow_server.uri)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert all(row["round_s"] < 5 for row in rows[2:5])  # away: no round waited for it
    record = TrackedRun.load(tmp_path / "run")
    run = client(mlflow_server).get_run(record.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["client.lr"] == "0.1" and run.data.tags["run.rounds"] == "8"
    assert_every_round_once(mlflow_server, record.mlflow_run_id)
    artifacts = {a.path for a in client(mlflow_server).list_artifacts(record.mlflow_run_id)}
    assert {"scenario.toml", "metrics.csv", "clients.csv", "model.safetensors",
            "summary.json"} <= artifacts


@pytest.mark.slow
def test_a_server_away_all_run_long_gets_everything_from_sync(tmp_path, mlflow_server,
                                                             monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = TEXT.replace("flush_timeout_s = 60.0", "flush_timeout_s = 1.0")
    started = time.monotonic()
    serve(text, tmp_path / "run", tmp_path, tracking_uri=mlflow_server.uri)
    assert time.monotonic() - started < 60  # the run did not wait for MLflow
    record = TrackedRun.load(tmp_path / "run")
    assert record.mlflow_run_id == "" and record.status == "FINISHED"
    mlflow_server.start()
    assert main(["sync", str(tmp_path / "run")]) == 0
    assert f"{ROUNDS} rounds pushed now, status FINISHED" in capsys.readouterr().out
    record = TrackedRun.load(tmp_path / "run")
    assert client(mlflow_server).get_run(record.mlflow_run_id).info.status == "FINISHED"
    assert main(["sync", str(tmp_path / "run")]) == 0  # again: nothing twice
    assert "0 rounds pushed now" in capsys.readouterr().out
    assert_every_round_once(mlflow_server, record.mlflow_run_id)
    experiment = client(mlflow_server).get_experiment_by_name("mirror").experiment_id
    assert len(client(mlflow_server).search_runs([experiment])) == 1
    (model,) = client(mlflow_server).search_logged_models([experiment])  # logged once, by sync
    samples = read_samples(tmp_path / "run")  # taken while MLflow was away, pushed by sync
    memory = client(mlflow_server).get_metric_history(record.mlflow_run_id,
                                                     "system/system_memory_usage_megabytes")
    assert [(m.step, m.value) for m in memory] == [
        (s["step"], s["metrics"]["system_memory_usage_megabytes"]) for s in samples]
    assert len(samples) >= 1
    assert (model.model_id, model.source_run_id) == (record.model_id, record.mlflow_run_id)


def test_an_unreachable_server_is_found_in_seconds():
    started = time.monotonic()
    assert unreachable(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 4
    assert unreachable("sqlite:////proc/no/such/folder/mlflow.db")
    assert unreachable(f"sqlite:///{Path.cwd() / 'mlflow.db'}") == ""


def test_sync_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["sync", str(tmp_path)]) == 2
    assert "not a run folder: no tracking.json" in capsys.readouterr().err
