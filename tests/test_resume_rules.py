"""What `fedsparse run --resume` may change: refused before anything starts (naming the key),
the run folder left as it was, nothing to do said without starting Ray, and a resumed run
tracked as a fresh one would be (MLflow params unchanged, the resumable keys as tags)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from fedsparse.cli import main
from fedsparse.resume import RESUMABLE, plan_resume
from fedsparse.scenario import ScenarioError
from fedsparse.tracking.mirror import TrackedRun
from tests.conftest import digits_scenario
from tests.local_grid import serve

pytestmark = pytest.mark.usefixtures("flower_task")

TEXT = digits_scenario(run={"rounds": 2, "eval_every": 1})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run folder that finished its 2 rounds."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    workdir = tmp_path_factory.mktemp("resume-rules")
    serve(TEXT, workdir / "run", workdir)
    return workdir / "run"


@pytest.mark.parametrize(("overrides", "keys"), [
    (["model.hidden=[16]"], ["model.hidden"]),
    (["client.lr=0.5", "seed=99"], ["client.lr", "seed"]),
    (["data.num_clients=5"], ["data.num_clients"]),
])
def test_an_override_that_changes_the_experiment_is_refused(finished, capsys, overrides,
                                                           keys):
    before = (finished / "scenario.toml").read_bytes()
    args = ["run", "--resume", str(finished)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    for key in keys:
        assert f"{key} = " in err and "a resumed run keeps its scenario" in err
    assert (finished / "scenario.toml").read_bytes() == before  # never overwritten


def test_rounds_can_only_be_raised(finished, capsys):
    assert main(["run", "--resume", str(finished), "--set", "run.rounds=1"]) == 2
    assert "run.rounds = 1: the run has finished 2 rounds; --resume can only raise " \
           "run.rounds" in capsys.readouterr().err
    plan = plan_resume(finished, ["run.rounds=5", "run.round_timeout_s=9.0",
                                  "run.node_wait_s=7.0"])
    assert plan.scenario.run.rounds == 5 and not plan.finished


def test_nothing_left_to_do_is_said_without_starting_anything(finished, capsys):
    started = time.monotonic()
    assert main(["run", "--resume", str(finished)]) == 0
    assert time.monotonic() - started < 5
    assert "has finished all 2 rounds; nothing to do" in capsys.readouterr().err
    assert not (finished / "flower.log").exists()  # no Flower, no Ray


def test_a_folder_without_a_checkpoint_cannot_be_resumed(tmp_path):
    (tmp_path / "scenario.toml").write_text(TEXT)
    with pytest.raises(ScenarioError, match="no checkpoint: the run finished no round"):
        plan_resume(tmp_path)
    with pytest.raises(ScenarioError, match="not a run folder"):
        plan_resume(tmp_path / "nothing")


def test_a_resumed_run_keeps_its_params_and_updates_its_resumable_tags(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    serve(TEXT, tmp_path / "run", tmp_path)
    first = TrackedRun.load(tmp_path / "run")
    longer = TEXT.replace("rounds = 2", "rounds = 3")
    serve(longer, tmp_path / "run", tmp_path, resume=True)
    record = TrackedRun.load(tmp_path / "run")
    assert record.mlflow_run_id == first.mlflow_run_id and record.params == first.params
    assert not set(record.params) & set(RESUMABLE)
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        record.mlflow_run_id)
    assert run.data.params == first.params and run.data.tags["run.rounds"] == "3"
    assert run.info.status == "FINISHED"
    assert (tmp_path / "run" / "scenario.toml").read_text().count("rounds = 3") == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tempfile.TemporaryDirectory() as tmp:  # the second session's files, not the first's
        pushed = Path(client.download_artifacts(record.mlflow_run_id, "summary.json", tmp))
        assert json.loads(pushed.read_text())["rounds"] == 3
        pushed = Path(client.download_artifacts(record.mlflow_run_id, "metrics.csv", tmp))
        assert len(pushed.read_text().splitlines()) == 1 + 3
    (model,) = client.search_logged_models([run.info.experiment_id])  # one, re-logged
    assert model.model_id == record.model_id and model.tags["fedsparse.round"] == "3"
