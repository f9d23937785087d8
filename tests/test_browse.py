"""Runs read back without running them: ``fedsparse ls``, ``show`` and ``report`` on run
folders (finished, stopped, in use) and on MLflow runs under grouped and plain metric names;
labels that name what differs; ``--sweep``; the report's plots and tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsparse.checkpoint import Checkpoint
from fedsparse.cli import main
from fedsparse.run_lock import hold
from fedsparse.scenario import ScenarioError, load_scenario, sweep_overrides
from fedsparse.tracking.history import write_csv
from fedsparse.tracking.metric_names import mlflow_metric
from fedsparse.tracking.runs import RunNotFound, differing, from_folder, from_mlflow, labels
from fedsparse.tracking.summary import summarize
from tests.conftest import DATA


def history(rounds: int, accuracy: float) -> list[dict]:
    return [{"round": r, "accuracy": accuracy * r / rounds, "loss": 1.0 / r,
             "fed_accuracy_weighted": accuracy * r / rounds - 0.01,
             "fed_accuracy_mean": accuracy * r / rounds - 0.02,
             "fed_accuracy_bottom10": accuracy * r / rounds - 0.1, "uplink_bytes": 1000,
             "cum_uplink_bytes": 1000 * r, "cum_downlink_bytes": 2000 * r,
             "cum_train_flops": 10**9 * r, "round_s": 0.5, "clients_ok": 3}
            for r in range(1, rounds + 1)]


def run_folder(root: Path, name: str, lr: float, rounds: int = 3, finished: bool = True,
               accuracy: float = 0.9) -> Path:
    """A run folder as a run of tests/data/digits.toml with ``client.lr`` leaves it."""
    scenario = load_scenario(DATA / "digits.toml", [f"client.lr={lr}", f"run.rounds={rounds}",
                                                    f'name="{name}"'])
    folder = root / f"{name}-{lr}"
    folder.mkdir(parents=True)
    (folder / "scenario.toml").write_text(scenario.to_toml())
    rows = history(rounds, accuracy)
    if finished:
        write_csv(rows, folder / "metrics.csv")
        summary = {**summarize(rows, 2.0, ""), "total_wall_s": 9.5, "run_dir": str(folder),
                   "failure": ""}
        (folder / "summary.json").write_text(json.dumps(summary))
    else:  # stopped after round 2 of 3: only its checkpoint
        Checkpoint(2, {}, {"history": rows[:2]}).save(folder)
    return folder


def test_labels_name_what_differs_and_only_where_names_are_the_same():
    params = [{"name": "a", "client.lr": "0.1", "seed": "1"},
              {"name": "a", "client.lr": "0.01", "seed": "1"},
              {"name": "b", "client.lr": "0.1", "seed": "2"}]
    assert differing(params) == ["name", "client.lr", "seed"]
    assert labels(["a", "a", "b"], params, ["1", "2", "3"]) == [
        "a client.lr=0.1", "a client.lr=0.01", "b"]
    same = [{"name": "a", "seed": "1"}] * 2
    assert labels(["a", "a"], same, ["x1", "x2"]) == ["a [x1]", "a [x2]"]
    assert labels(["a", "a"], same, ["x1", "x1"]) == ["a [x1] #1", "a [x1] #2"]
    assert differing([{"description": "x", "k": "1"}, {"description": "y", "k": "1"}]) == []


def test_sweep_runs_every_combination_and_refuses_what_is_no_array():
    assert sweep_overrides([]) == [[]]
    lr, name = ["client.lr=0.1", "client.lr=0.01"], ['run.rounds=2', 'run.rounds=5']
    assert sweep_overrides(["client.lr=[0.1, 0.01]", "run.rounds=[2, 5]"]) == [
        [lr[0], name[0]], [lr[0], name[1]], [lr[1], name[0]], [lr[1], name[1]]]
    assert sweep_overrides(['strategy.name=["fedavg", "scaffold"]']) == [
        ['strategy.name="fedavg"'], ['strategy.name="scaffold"']]
    for bad in ("client.lr=0.1", "client.lr=[]", "=[1]", "client.lr"):
        with pytest.raises(ScenarioError, match=r"(?s)--sweep.*expected KEY=\[V1, V2, \.\.\.\]"):
            sweep_overrides([bad])


def test_ls_lists_finished_stopped_and_running_folders(tmp_path, capsys):
    run_folder(tmp_path / "runs", "digits", 0.1)
    run_folder(tmp_path / "runs", "digits", 0.01, finished=False)
    busy = run_folder(tmp_path / "runs", "other", 0.1, finished=False)
    with hold(busy):
        assert main(["ls", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "status", "rounds", "accuracy", "uplink", "MB", "where"]
    rows = {line.split("  ")[0].strip(): line for line in lines[1:]}
    assert set(rows) == {"digits client.lr=0.1", "digits client.lr=0.01", "other"}
    assert "FINISHED" in rows["digits client.lr=0.1"] and " 3/3 " in rows["digits client.lr=0.1"]
    assert "0.9000" in rows["digits client.lr=0.1"] and " 0.0 " in rows["digits client.lr=0.1"]
    assert "STOPPED after round 2" in rows["digits client.lr=0.01"]
    assert " 2/3 " in rows["digits client.lr=0.01"]
    assert "RUNNING after round 2" in rows["other"]
    assert main(["ls", str(tmp_path / "nothing")]) == 0
    assert capsys.readouterr().out.startswith("no runs in")
    done = tmp_path / "runs/digits-0.1"
    assert not (done / ".lock").exists()  # ls looked without taking (or making) a lock


def test_ls_says_which_folder_it_cannot_read_and_lists_the_rest(tmp_path, capsys):
    good = run_folder(tmp_path / "runs", "digits", 0.1)
    torn = run_folder(tmp_path / "runs", "digits", 0.01)
    (torn / "summary.json").write_text('{"rounds": 3, "fin')
    assert main(["ls", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr()
    assert str(good) in out.out and str(torn) not in out.out
    assert f"fedsparse: note: {torn} is left out: it cannot be read (JSONDecodeError" in out.err


def test_a_finished_run_resumed_for_more_rounds_is_not_finished_until_it_ends(tmp_path):
    folder = run_folder(tmp_path, "digits", 0.1)  # finished after 3 rounds
    rows = history(5, 0.9)
    Checkpoint(4, {}, {"history": rows[:4]}).save(folder)  # resumed to 5, stopped after 4
    view = from_folder(folder)
    assert (view.status, view.rounds) == ("STOPPED", 4)


def test_show_prints_the_summary_and_a_row_per_round(tmp_path, capsys):
    folder = run_folder(tmp_path, "digits", 0.1)
    assert main(["show", str(folder), "--scenario"]) == 0
    out = capsys.readouterr().out
    assert 'name = "digits"' in out  # the scenario
    assert f"digits: FINISHED, 3 of 3 rounds ({folder})" in out
    assert "  accuracy            0.9000 (centralised test set)" in out
    table = out[out.index("round  accuracy"):].splitlines()
    assert table[0].split() == ["round", "accuracy", "loss", "fed.", "accuracy", "clients",
                                "ok", "uplink", "MB", "cum.", "uplink", "MB", "round", "s"]
    assert table[3].split() == ["3", "0.9000", "0.3333", "0.8900", "3", "0.00", "0.00", "0.50"]
    with pytest.raises(SystemExit):
        main(["show"])


def test_show_refuses_what_is_neither_a_folder_nor_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["show", "0123abcd"]) == 2
    assert "fedsparse: 0123abcd: no run folder, and no MLflow run of that id: no MLflow store " \
           f"at sqlite:///{tmp_path / 'mlflow.db'}" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # reading runs back creates no store
    assert main(["show", "0123abcd", "--tracking-uri", "http://127.0.0.1:9"]) == 2
    assert "MLflow at http://127.0.0.1:9 is unreachable" in capsys.readouterr().err


def test_report_of_folders_names_what_differs_in_its_tables_and_legends(tmp_path, capsys):
    fast = run_folder(tmp_path / "runs", "digits", 0.1, accuracy=0.9)
    slow = run_folder(tmp_path / "runs", "digits", 0.01, accuracy=0.6)
    assert main(["report", str(fast), str(slow), "--out", str(tmp_path / "rep"),
                 "--target", "0.8", "--reference", "digits client.lr=0.1"]) == 0
    report = (tmp_path / "rep/report.md").read_text()
    assert "| digits client.lr=0.1 | 0.9000 |" in report
    assert "| run | `client.lr` |" in report and "| digits client.lr=0.01 | 0.01 |" in report
    plots = {p.name for p in (tmp_path / "rep/plots").iterdir()}
    assert plots == {"accuracy_vs_round.png", "accuracy_vs_uplink.png", "loss_vs_round.png",
                     "fed_accuracy_vs_round.png"}
    empty = run_folder(tmp_path / "runs", "digits", 0.5, finished=False)
    (empty / "checkpoint.npz").unlink()  # stopped before round 1
    (empty / "checkpoint.prev.npz").unlink(missing_ok=True)
    assert main(["report", str(fast), str(empty), "--out", str(tmp_path / "rep2")]) == 0
    assert f"{empty} (digits) has no finished round; it is left out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(fast), "--experiment", "x"])  # one or the other
    assert main(["report", str(fast), "--reference", "nope"]) == 2
    assert "'nope' is none of the runs; allowed: digits\n" in capsys.readouterr().err


def test_report_plots_have_whole_rounds_the_target_and_the_legends(tmp_path):
    from fedsparse.tracking.plots import pyplot, round_plots

    plt = pyplot()
    drawn = []
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        round_plots({"a lr=0.1": history(3, 0.9), "a lr=0.01": history(3, 0.6)}, tmp_path,
                    target=0.8)
    finally:
        plt.Figure.savefig = original
    by_round = drawn[0].axes[0]
    assert all(float(t).is_integer() for t in by_round.get_xticks())
    legend = [t.get_text() for t in by_round.get_legend().get_texts()]
    assert legend == ["a lr=0.1", "a lr=0.01", "target 0.8"]
    assert [line.get_ydata()[0] for line in by_round.get_lines()][-1] == 0.8
    loss = drawn[2].axes[0]
    assert loss.get_ylabel() == "centralised test loss" and len(loss.get_lines()) == 2


def test_mlflow_runs_read_back_under_grouped_and_plain_names(tmp_path):
    from mlflow.entities import Metric

    from fedsparse.tracking.mlflow_run import client_for, experiment_id

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = client_for(uri)
    exp = experiment_id(uri, "e", (tmp_path / "mlruns").as_uri())
    rows = history(3, 0.9)
    runs = []
    for grouped in (True, False):  # logged now, and as runs tracked before the grouping were
        run = client.create_run(exp, tags={"fedsparse.scenario": "digits"})
        client.log_param(run.info.run_id, "client.lr", "0.1" if grouped else "0.01")
        for row in rows:
            pairs = [mlflow_metric(k, v) if grouped else (k, v)
                     for k, v in row.items() if k != "round"]
            client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), 0, row["round"])
                                                       for k, v in pairs])
        for sample in range(5):  # steps that are samples, not rounds
            client.log_metric(run.info.run_id, "system/cpu_utilization_percentage", 50.0,
                              step=sample)
        client.log_metric(run.info.run_id, "fedsparse_round", 3.0, step=3)
        runs.append(from_mlflow(client, client.get_run(run.info.run_id)))
    for view in runs:
        assert view.history == [{k: float(v) if k != "round" else v for k, v in r.items()}
                                for r in rows]
        assert view.summary["final_accuracy"] == pytest.approx(0.9)
        assert view.summary["uplink_bytes"] == 3000
    assert labels([v.name for v in runs], [v.params for v in runs], ["1", "2"]) == [
        "digits client.lr=0.1", "digits client.lr=0.01"]


def test_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(RunNotFound, match=r"no run folder: it has no scenario\.toml"):
        from_folder(tmp_path)
