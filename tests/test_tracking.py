"""Checkpoints, metric history, summaries, events, reports (no Flower run needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedsparse.checkpoint import FILE, PREVIOUS, Checkpoint
from fedsparse.durable import CorruptFile
from fedsparse.tracking import events
from fedsparse.tracking.history import read_csv, write_csv
from fedsparse.tracking.report import markdown_table, write_report
from fedsparse.tracking.summary import summarize

HISTORY = [
    {"round": 1, "uplink_bytes": 100, "cum_uplink_bytes": 100, "cum_downlink_bytes": 200,
     "cum_train_flops": 1e9, "round_s": 1.5, "clients_failed": 1, "clients_rejected": 0},
    {"round": 2, "uplink_bytes": 50, "cum_uplink_bytes": 150, "cum_downlink_bytes": 400,
     "cum_train_flops": 2e9, "round_s": 1.0, "accuracy": 0.8, "loss": 0.5,
     "fed_accuracy_weighted": 0.7, "clients_failed": 0, "clients_rejected": 2},
    {"round": 3, "uplink_bytes": 50, "cum_uplink_bytes": 200, "cum_downlink_bytes": 600,
     "cum_train_flops": 3e9, "round_s": 1.0, "clients_failed": 0, "clients_rejected": 0,
     "eval_clients_failed": 1, "eval_clients_rejected": 0},
]


def test_checkpoint_round_trip_is_exact(tmp_path: Path):
    arrays = {"model/w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
              "strategy/c": np.arange(5, dtype=np.int64)}
    Checkpoint(round=4, arrays=arrays, state={"history": HISTORY, "run": "abc"}).save(tmp_path)
    loaded = Checkpoint.load(tmp_path)
    assert loaded.round == 4 and loaded.state == {"history": HISTORY, "run": "abc"}
    assert arrays.keys() == loaded.arrays.keys()
    for key in arrays:
        assert np.array_equal(arrays[key], loaded.arrays[key])
        assert arrays[key].dtype == loaded.arrays[key].dtype
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temp file left behind


def test_checkpoint_keeps_two_generations_and_refuses_reserved_names(tmp_path: Path):
    for rnd in (1, 2, 3):
        Checkpoint(round=rnd, arrays={"w": np.full(2, rnd)}).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE, PREVIOUS]
    assert Checkpoint.load(tmp_path).round == 3
    with pytest.raises(FileNotFoundError):
        Checkpoint.load(tmp_path / "nowhere")
    for name in ("__document__", "__sha256__"):
        with pytest.raises(ValueError, match="reserved"):
            Checkpoint(round=1, arrays={name: np.zeros(1)}).save(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_generation(tmp_path: Path, damage,
                                                                   caplog):
    Checkpoint(round=1, arrays={"w": np.zeros(64, np.float32)}).save(tmp_path)
    Checkpoint(round=2, arrays={"w": np.ones(64, np.float32)}).save(tmp_path)
    latest = tmp_path / FILE
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":  # one bit of the array data
        offset = data.index(np.ones(1, np.float32).tobytes())
        data[offset] ^= 0x01
    else:
        data = bytearray(b"not a checkpoint")
    latest.write_bytes(bytes(data))
    loaded = Checkpoint.load(tmp_path)
    assert loaded.round == 1 and not loaded.arrays["w"].any()
    assert "previous generation" in caplog.text
    (tmp_path / PREVIOUS).write_bytes(b"also broken")
    with pytest.raises(CorruptFile, match="every checkpoint generation is damaged"):
        Checkpoint.load(tmp_path)


def test_history_csv_round_trip(tmp_path: Path):
    path = write_csv(HISTORY, tmp_path / "metrics.csv")
    assert path.read_text().splitlines()[0].startswith("round,")
    assert read_csv(path) == HISTORY


def test_summary_takes_the_last_evaluation_and_the_totals():
    summary = summarize(HISTORY, wall_s=9.5, mlflow_run_id="r1")
    assert summary["final_accuracy"] == 0.8 and summary["fed_accuracy_weighted"] == 0.7
    assert summary["uplink_bytes"] == 200 and summary["downlink_bytes"] == 600
    assert summary["train_flops"] == 3e9 and summary["rounds"] == 3
    assert summary["clients_failed"] == 1 and summary["clients_rejected"] == 2
    assert summary["eval_clients_failed"] == 1 and summary["replies_dropped"] == 4
    assert summary["wall_s"] == 9.5 and summary["rounds_s"] == 3.5
    assert summary["mlflow_run_id"] == "r1"
    json.dumps(summary)  # flat and serialisable
    with pytest.raises(ValueError):
        summarize([], 1.0, "r")


def test_events_round_trip(capsys):
    events.emit("round", round=3, metrics={"accuracy": 0.5})
    line = capsys.readouterr().out
    assert events.parse("(ServerApp) " + line) == {"event": "round", "round": 3,
                                                   "metrics": {"accuracy": 0.5}}
    assert events.parse("INFO: round 3") is None
    assert events.parse(events.PREFIX + "{not json") is None


def test_report_has_a_table_and_overlay_plots(tmp_path: Path):
    summaries = {"a": summarize(HISTORY, 1.0, "r1"), "b": summarize(HISTORY[:2], 2.0, "r2")}
    files = write_report(summaries, {"a": HISTORY, "b": HISTORY[:2]}, tmp_path, "A vs B")
    assert {f.name for f in files} == {"report.md", "summary.csv", "a.csv", "b.csv",
                                       "accuracy_vs_round.png", "accuracy_vs_uplink.png",
                                       "loss_vs_round.png", "fed_accuracy_vs_round.png"}
    table = markdown_table(summaries)
    assert "| a | 0.8000 |" in table and "| r2 |" in table
    assert "| replies dropped |" in table and "| 3 | 4 |" in table  # a: 3 rounds, 4 dropped
    assert [row["run"] for row in read_csv(tmp_path / "summary.csv")] == ["a", "b"]
    assert read_csv(tmp_path / "metrics/a.csv") == HISTORY


def test_report_rounds_to_target_and_uplink_reduction(tmp_path: Path):
    slow = [dict(r, accuracy=r.get("accuracy", 0) / 2) for r in HISTORY]
    cheap = [dict(r, cum_uplink_bytes=r["cum_uplink_bytes"] / 10) for r in HISTORY]
    histories = {"dense": HISTORY, "slow": slow, "cheap": cheap}
    summaries = {k: summarize(v, 1.0, k) for k, v in histories.items()}
    write_report(summaries, histories, tmp_path, "t", target=0.75, reference="dense")
    rows = {r["run"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert rows["dense"]["rounds_to_target"] == 2 and "rounds_to_target" not in rows["slow"]
    assert rows["dense"]["uplink_reduction"] == 1 and rows["cheap"]["uplink_reduction"] == 10
    report = (tmp_path / "report.md").read_text()
    assert "rounds to target" in report and "| cheap |" in report


def _experiment_in_fresh_store(uri: str) -> str:
    from fedsparse.tracking.mlflow_run import experiment_id

    return experiment_id(uri, "together")


def test_runs_starting_together_on_a_fresh_store_both_get_the_experiment(tmp_path: Path):
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        ids = pool.map(_experiment_in_fresh_store, [uri] * 3)
    assert len(set(ids)) == 1


def test_bottom_decile_is_the_mean_of_the_worst_tenth_and_at_least_one():
    from fedsparse.metrics.aggregate import bottom_decile_mean

    assert bottom_decile_mean([0.9, 0.1, 0.5]) == 0.1
    assert bottom_decile_mean([i / 100 for i in range(20, 0, -1)]) == pytest.approx(0.015)
    assert np.isnan(bottom_decile_mean([]))


def test_standard_error_is_the_sample_deviation_over_root_n():
    from fedsparse.metrics.aggregate import standard_error

    values = [1.0, 2.0, 4.0, 7.0]  # mean 3.5, squared deviations sum to 21, ddof 1: 7
    assert standard_error(values) == pytest.approx(math.sqrt(7) / 2)
    assert standard_error(values) == pytest.approx(np.std(values, ddof=1) / np.sqrt(4))
    assert np.isnan(standard_error([3.0]))


def test_a_running_mirror_pushes_params_and_tags_once_then_only_rounds(tmp_path: Path,
                                                                       monkeypatch):
    """Re-setting every tag after every round cost the ServerApp one SQL transaction per tag
    per round, on the process that also moves the clients' messages."""
    from collections import Counter

    from fedsparse.scenario import parse_scenario
    from fedsparse.tracking import mlflow_run
    from fedsparse.tracking.mirror import BackgroundMirror, new_tracked_run
    from tests.conftest import digits_scenario

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = new_tracked_run(parse_scenario(digits_scenario()), tracking_uri=uri,
                             artifact_location=(tmp_path / "mlruns").as_uri(), run_name="",
                             parent_run_id="", fedsparse_run_id="one")
    calls: Counter = Counter()
    real = mlflow_run.client_for

    def counting(tracking_uri: str):
        client = real(tracking_uri)
        for name in ("set_tag", "log_batch"):
            method = getattr(client, name)

            def counted(*args, _method=method, _name=name, **kwargs):
                calls[_name if _name == "set_tag" else f"log_batch:{sorted(kwargs)}"] += 1
                return _method(*args, **kwargs)
            setattr(client, name, counted)
        return client

    monkeypatch.setattr(mlflow_run, "client_for", counting)
    rows = [{"round": r, "accuracy": 0.1 * r} for r in (1, 2, 3)]
    mirror = BackgroundMirror(record, tmp_path, lambda: rows)
    mirror.round_done(1)
    assert mirror.synced.wait(60)
    first = dict(calls)
    assert first["set_tag"] == len(record.tags) and first["log_batch:['params']"] >= 1
    mirror.round_done(2)
    mirror.round_done(3)
    assert mirror.close(60)
    assert calls["set_tag"] == first["set_tag"]
    assert calls["log_batch:['params']"] == first["log_batch:['params']"]
    history = real(uri).get_metric_history(record.mlflow_run_id, "eval/accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_a_process_killed_while_it_creates_the_store_leaves_none_half_migrated(tmp_path: Path):
    """The first run in a folder migrates a new SQLite store for seconds; killed then (a run
    stopped in its first seconds), it must not leave a store no later run can open."""
    import signal
    import subprocess
    import sys
    import time

    from fedsparse.tracking.mlflow_run import client_for

    db = tmp_path / "mlflow.db"
    probe = ("from fedsparse.tracking.mlflow_run import client_for; "
             f"client_for('sqlite:///{db}')")
    proc = subprocess.Popen([sys.executable, "-c", probe])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".mlflow.db.*.new")):  # migrating
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not db.exists()  # nothing half-made in its place
    client = client_for(f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert not list(tmp_path.glob(".mlflow.db.*.new"))


def test_two_threads_writing_one_file_leave_it_whole(tmp_path: Path):
    """The mirror's thread and the ServerApp's save ``tracking.json`` at once (the last
    system metrics sample and the run's end): neither fails, and the file is one of theirs."""
    import threading

    from fedsparse.durable import write_bytes

    texts = [b"x" * 100_000, b"short"]
    errors = []

    def write(text: bytes) -> None:
        try:
            for _ in range(200):
                write_bytes(tmp_path / "tracking.json", text)
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and (tmp_path / "tracking.json").read_bytes() in texts
    assert not list(tmp_path.glob(".tracking.json.*.tmp"))
