"""End to end on the Ray Simulation Engine, through the CLI: tracking, reproducibility,
resume, comparisons, and the quickstart's accuracy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fedsparse.cli import main
from fedsparse.resume import RESUMABLE
from fedsparse.scenario import load_scenario
from fedsparse.tracking.history import read_csv
from tests.conftest import DATA, REPO, flower_processes

pytestmark = pytest.mark.simulation

TIMING = ("round_s", "train_s")
MODEL_BYTES = (64 * 32 + 32 + 32 * 10 + 10) * 4  # MLP 64-32-10, float32


def fedsparse(*args: str) -> int:
    return main([str(a) for a in args])


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory):
    """One 3-round digits run shared by the tests of this module."""
    workdir = tmp_path_factory.mktemp("sim")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert fedsparse("run", DATA / "digits.toml", "--run-dir", "runs/a",
                         "--summary", "a.json", "--quiet") == 0
        assert not flower_processes(workdir)  # every process the run started is gone
        yield workdir, json.loads((workdir / "a.json").read_text())


def test_summary_has_the_required_keys(first_run):
    _, summary = first_run
    for key in ("final_accuracy", "uplink_bytes", "downlink_bytes", "train_flops", "rounds",
                "wall_s", "mlflow_run_id", "fed_accuracy_mean", "fed_accuracy_weighted"):
        assert key in summary
    assert summary["rounds"] == 3 and 0.7 < summary["final_accuracy"] <= 1.0
    assert summary["clients_failed"] == summary["clients_rejected"] == 0
    assert summary["replies_dropped"] == 0


def test_bytes_and_flops_are_accounted_per_client_and_round(first_run):
    workdir, summary = first_run
    rows = read_csv(workdir / "runs/a/metrics.csv")
    clients = read_csv(workdir / "runs/a/clients.csv")
    train = [c for c in clients if c["phase"] == "train"]
    assert len(train) == 3 * 3  # 3 of 6 clients per round (fraction_train 0.5)
    assert {c["uplink_bytes"] for c in train} == {MODEL_BYTES}
    assert {c["downlink_bytes"] for c in train} == {MODEL_BYTES}
    for row in rows:
        ok = [c for c in train if c["round"] == row["round"]]
        assert row["uplink_bytes"] == row["downlink_bytes"] == len(ok) * MODEL_BYTES
        assert row["train_flops"] == sum(c["train_flops"] for c in ok) > 0
    assert summary["uplink_bytes"] == sum(r["uplink_bytes"] for r in rows) == 9 * MODEL_BYTES
    assert summary["train_flops"] == sum(r["train_flops"] for r in rows)
    evals = [c for c in clients if c["phase"] == "evaluate"]
    assert len(evals) == 3 * 6 and {c["uplink_bytes"] for c in evals} == {0}


def test_mlflow_run_holds_params_metrics_and_artifacts(first_run):
    workdir, summary = first_run
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    scenario = load_scenario(DATA / "digits.toml")
    flat = {k: str(v) for k, v in scenario.flat().items()}
    assert run.data.params == {k: v for k, v in flat.items() if k not in RESUMABLE}
    resumable = [k for k in RESUMABLE if k in flat]
    assert {k: run.data.tags[k] for k in resumable} == {k: flat[k] for k in resumable}
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tests"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "a"  # the run folder's name: unique in the runs table
    assert summary["mlflow_experiment_id"] == run.info.experiment_id
    history = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == summary["final_accuracy"]
    uplink = client.get_metric_history(run.info.run_id, "comm/cum_uplink_MB")  # grouped, in MB
    assert [m.value for m in uplink] == pytest.approx([n * MODEL_BYTES / 1e6 for n in (3, 6, 9)])
    assert {key.split("/")[0] for key in run.data.metrics} == {
        "eval", "comm", "compute", "clients", "time", "train", "model", "system",
        "fedsparse_round"}
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    samples = (workdir / "runs/a/system_metrics.jsonl").read_text().splitlines()
    assert len(cpu) == len(samples) >= 1  # the last one taken as the run ends
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"scenario.toml", "metrics.csv", "clients.csv", "model.safetensors",
            "summary.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {f"plots/{name}.png" for name in ("accuracy_vs_round", "accuracy_vs_uplink",
                                                      "loss_vs_round", "fed_accuracy_vs_round")}
    assert (workdir / "mlruns").is_dir()  # artifacts under the working directory


def test_mlflow_run_says_which_code_and_command_ran_it(first_run):
    workdir, summary = first_run
    from importlib.metadata import version

    from mlflow import MlflowClient

    import fedsparse

    tags = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}").get_run(
        summary["mlflow_run_id"]).data.tags
    assert tags["fedsparse.version"] == fedsparse.__version__
    for package in ("flwr", "torch", "ray", "mlflow"):
        assert tags[f"fedsparse.{package}_version"] == version(package)
    assert tags["fedsparse.command"] == (f"fedsparse run {DATA / 'digits.toml'} --run-dir "
                                         f"runs/a --summary a.json --quiet")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()


def test_final_weights_reproduce_the_final_accuracy(first_run):
    workdir, summary = first_run
    import torch
    from safetensors.torch import load_file

    from fedsparse.data import held_out_set
    from fedsparse.models import build_model
    from fedsparse.training import evaluate

    scenario = load_scenario(DATA / "digits.toml")
    model = build_model(scenario.model, (1, 8, 8), 10)
    model.load_state_dict(load_file(workdir / "runs/a/model.safetensors"))
    x, y = held_out_set(scenario.data, scenario.seed)
    with torch.no_grad():
        assert evaluate(model, x, y).accuracy == summary["final_accuracy"]


def test_the_final_model_is_an_mlflow_model_that_predicts_the_final_accuracy(first_run):
    """``mlflow.pytorch.load_model`` loads the run's logged model (by its id and through the
    run) with a signature and an input example, and it scores the run's final accuracy."""
    workdir, summary = first_run
    import mlflow
    import torch
    from mlflow import MlflowClient

    from fedsparse.data import held_out_set
    from fedsparse.training import evaluate

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    run = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"])
    (output,) = run.outputs.model_outputs
    assert output.step == 3
    logged = MlflowClient(tracking_uri=uri).get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, logged.status.to_proto()) == (
        "model", run.info.run_id, 2)  # READY
    assert logged.tags["fedsparse.round"] == "3"
    scenario = load_scenario(DATA / "digits.toml")
    x, y = held_out_set(scenario.data, scenario.seed)
    mlflow.set_tracking_uri(uri)
    try:
        for address in (f"models:/{output.model_id}", f"runs:/{run.info.run_id}/model"):
            info = mlflow.models.get_model_info(address)
            assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == \
                [-1, 1, 8, 8]
            assert info.saved_input_example_info is not None
            model = mlflow.pytorch.load_model(address)
            with torch.no_grad():
                assert evaluate(model, x, y).accuracy == summary["final_accuracy"]
    finally:
        mlflow.set_tracking_uri(None)


def test_the_mlflow_ui_serves_the_run_with_grouped_metrics_tags_and_its_model(first_run):
    """What a user's browser gets: `mlflow server` over the run's store answers its REST API
    with the run (its folder's name, grouped metrics, the code's tags), the experiment in the
    model-training kind, the logged model ready, and the UI page itself."""
    workdir, summary = first_run
    import urllib.request

    from tests.mlflow_server import MlflowServer

    def get(path: str) -> dict:
        with urllib.request.urlopen(f"{server.uri}{path}", timeout=30) as response:
            return json.load(response)

    server = MlflowServer(workdir, store=workdir / "mlflow.db")
    server.start()
    try:
        run = get(f"/api/2.0/mlflow/runs/get?run_id={summary['mlflow_run_id']}")["run"]
        assert run["info"]["run_name"] == "a" and run["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in run["data"]["metrics"]}
        assert {"eval/accuracy", "comm/cum_uplink_MB", "compute/train_GFLOPs",
                "clients/failed", "time/round_s", "system/cpu_utilization_percentage"} <= keys
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["fedsparse.scenario"] == "digits-test"
        assert tags["fedsparse.command"].startswith("fedsparse run ")
        assert {"fedsparse.version", "fedsparse.flwr_version", "fedsparse.torch_version"} <= \
            tags.keys()
        (output,) = run["outputs"]["model_outputs"]
        model = get(f"/api/2.0/mlflow/logged-models/{output['model_id']}")["model"]["info"]
        assert (model["name"], model["source_run_id"], model["status"]) == (
            "model", summary["mlflow_run_id"], "LOGGED_MODEL_READY")
        experiment = get(f"/api/2.0/mlflow/experiments/get?experiment_id="
                         f"{run['info']['experiment_id']}")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in \
            experiment["tags"]
        with urllib.request.urlopen(f"{server.uri}/", timeout=30) as page:
            assert page.status == 200 and b"<title>MLflow</title>" in page.read()
    finally:
        server.stop()


def test_same_seed_same_metrics_and_resume_continues_exactly(first_run, monkeypatch):
    workdir, summary = first_run
    monkeypatch.chdir(workdir)
    first = deterministic(read_csv(workdir / "runs/a/metrics.csv"))
    assert fedsparse("run", DATA / "digits.toml", "--set", "run.rounds=2",
                     "--run-dir", "runs/b", "--summary", "b1.json", "--quiet") == 0
    assert deterministic(read_csv(workdir / "runs/b/metrics.csv")) == first[:2]
    assert fedsparse("run", "--resume", "runs/b", "--set", "run.rounds=3",
                     "--summary", "b.json", "--quiet") == 0
    resumed = json.loads((workdir / "b.json").read_text())
    session = json.loads((workdir / "b1.json").read_text())
    for key in ("wall_s", "total_wall_s"):  # both sessions, as a run never interrupted
        assert resumed[key] > session[key]
    assert deterministic(read_csv(workdir / "runs/b/metrics.csv")) == first
    assert resumed["final_accuracy"] == summary["final_accuracy"]
    assert resumed["uplink_bytes"] == summary["uplink_bytes"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(resumed["mlflow_run_id"], "eval/accuracy")]
    assert steps == [1, 2, 3]  # one MLflow run across the interruption


def test_compare_sweeps_into_one_experiment_with_a_report(workdir: Path, first_run, capsys):
    """A ``--sweep`` of two learning rates: the arms share one SuperLink and one Ray, an arm
    gives the metrics it gives on its own (the second, after the first has used them,
    against ``first_run``), labels and MLflow run names say what differs, and ``report``,
    ``ls`` and ``show`` read the finished runs back from MLflow as from their folders."""
    assert fedsparse("compare", DATA / "digits.toml", "--sweep", "client.lr=[0.01, 0.1]",
                     "--experiment", "cmp", "--out", "report", "--quiet") == 0
    assert not flower_processes(workdir)
    started = "Starting Flower SuperLink"
    assert (workdir / "report/superlink.log").read_text().count(started) == 1
    arms = sorted((workdir / "runs").iterdir(), key=lambda arm: arm.stat().st_mtime)
    assert [started in (arm / "flower.log").read_text() for arm in arms] == [False, False]
    assert len(list((workdir / ".fedsparse/ray/ray").glob("session_2*"))) == 1  # one Ray
    assert ["lr = 0.1\n" in (arm / "scenario.toml").read_text() for arm in arms] == [False, True]
    assert deterministic(read_csv(arms[1] / "metrics.csv")) == \
        deterministic(read_csv(first_run[0] / "runs/a/metrics.csv"))
    report = (workdir / "report/report.md").read_text()
    labels = ["digits-test client.lr=0.01", "digits-test client.lr=0.1"]
    assert f"| {labels[0]} |" in report and f"| {labels[1]} |" in report
    assert "| run | `client.lr` |" in report
    assert (workdir / "report/plots/accuracy_vs_uplink.png").stat().st_size > 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cmp")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "comparison"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["client.lr"] for r in children} == {"0.1", "0.01"}
    names = {r.info.run_name for r in children}  # the label and the run folder's id
    assert names == {f"{label}-{arm.name.rsplit('-', 1)[-1]}"
                     for label, arm in zip(labels, arms, strict=True)}
    assert "report.md" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}

    capsys.readouterr()
    assert fedsparse("report", "--experiment", "cmp", "--out", "again") == 0
    keys = ("run", "final_accuracy", "fed_accuracy_weighted", "uplink_bytes", "rounds")
    assert [{k: row[k] for k in keys} for row in read_csv(workdir / "again/summary.csv")] == \
        [{k: row[k] for k in keys} for row in read_csv(workdir / "report/summary.csv")]
    assert fedsparse("ls", "--experiment", "cmp") == 0
    listed = capsys.readouterr().out
    assert fedsparse("ls") == 0
    for line in (listed, capsys.readouterr().out):
        assert all(label in line for label in labels) and line.count("FINISHED") == 2
    assert fedsparse("show", first_run[1]["mlflow_run_id"], "--tracking-uri",
                     f"sqlite:///{first_run[0] / 'mlflow.db'}") == 0
    shown = capsys.readouterr().out
    assert shown.startswith("digits-test: FINISHED, 3 of 3 rounds")
    accuracy = [f"{row['accuracy']:.4f}" for row in read_csv(first_run[0] / "runs/a/metrics.csv")]
    assert [line.split()[1] for line in shown.splitlines()[-3:]] == accuracy


def test_quickstart_reaches_90_percent(workdir: Path):
    assert fedsparse("run", REPO / "scenarios/quickstart.toml", "--summary", "qs.json",
                     "--quiet") == 0
    summary = json.loads((workdir / "qs.json").read_text())
    assert summary["final_accuracy"] >= 0.90
    assert summary["rounds"] == 10


def test_scafcom_on_ray_keeps_c_the_mean_of_all_c_i(workdir: Path):
    """Client state lives in Context.state across Ray actors; the server's audit queries every
    client after every round."""
    scenario = workdir / "scafcom.toml"
    scenario.write_text((DATA / "digits.toml").read_text()
                        .replace('program = "sgd"', 'program = "controlled_sgd"')
                        .replace("local_epochs = 3", "local_steps = 10")
                        .replace('name = "fedavg"', 'name = "scafcom"\naudit = true\nbeta = 0.5')
                        + '\n[strategy.compressor]\nname = "topk"\nratio = 0.05\n'
                          'value_dtype = "float16"\n')
    assert fedsparse("run", scenario, "--set", "run.rounds=4", "--run-dir", "runs/s",
                     "--summary", "s.json", "--quiet") == 0
    rows = read_csv(workdir / "runs/s/metrics.csv")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(r["audit_control_gap"] <= 1e-6 for r in rows)
    assert rows[-1]["control_norm"] > 0
    summary = json.loads((workdir / "s.json").read_text())
    assert summary["uplink_bytes"] < 12 * MODEL_BYTES / 10  # 12 messages of 5%, not dense
    assert summary["final_accuracy"] > 0.3


def test_continual_run_tracks_the_accuracy_matrix(tmp_path, monkeypatch):
    """A federated continual run on Ray: per-task metrics, matrix artifacts, CL summary.
    One round per task leaves TDM no round to freeze its mask in: the mask stays fixed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert fedsparse("run", DATA / "continual_digits.toml", "--set",
                     "continual.rounds_per_task=1", "--set", "run.rounds=5", "--set",
                     "run.eval_every=1", "--set", "strategy.mask_update=fixed", "--set",
                     "client.removal_every=1", "--set", "client.removal_until=1",
                     "--run-dir", "runs/c", "--summary", "c.json", "--quiet") == 0
    summary = json.loads((tmp_path / "c.json").read_text())
    for key in ("average_accuracy", "forgetting", "backward_transfer",
                "task_il_average_accuracy", "train_dense_flops"):
        assert key in summary
    assert summary["train_dense_flops"] > 2 * summary["train_flops"] > 0
    matrix = (tmp_path / "runs/c/plots/accuracy_matrix_class_il.csv").read_text().splitlines()
    assert len(matrix) == 6 and matrix[1].split(",")[2] == "nan"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "plots")}
    assert {"plots/accuracy_matrix_class_il.png", "plots/accuracy_matrix_task_il.png"} \
        <= artifacts
    density = client.get_metric_history(summary["mlflow_run_id"], "model/model_density")
    assert len(density) == 5 and all(abs(m.value - 0.25) < 1e-3 for m in density)
    assert not flower_processes(tmp_path)
