"""What the terminal shows: ``fedsparse`` bare and ``--version``, ``python -m fedsparse``,
a finished run's table (or one line with ``--quiet``) and a progress bar whose rate counts
rounds only."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from importlib.metadata import version

import pytest

from fedsparse.cli import main
from fedsparse.experiments import Progress
from fedsparse.tracking.summary import summarize
from fedsparse.tracking.terminal import mlflow_hint, one_line, table

HISTORY = [
    {"round": 1, "accuracy": 0.5, "loss": 1.5, "cum_uplink_bytes": 2e6,
     "cum_downlink_bytes": 4e6, "cum_train_flops": 3e9, "round_s": 2.0},
    {"round": 2, "accuracy": 0.9312, "loss": 0.2194, "fed_accuracy_weighted": 0.9287,
     "fed_accuracy_mean": 0.9296, "fed_accuracy_bottom10": 0.9111, "cum_uplink_bytes": 79.684e6,
     "cum_downlink_bytes": 79.684e6, "cum_train_flops": 205.87e9, "round_s": 1.5},
]


def finished(**extra: object) -> dict:
    summary = summarize(HISTORY, 10.0, "6d63abc")
    return {**summary, "total_wall_s": 23.44, "run_dir": "runs/quickstart-1", "failure": "",
            **extra}


def test_bare_fedsparse_prints_its_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fedsparse") and "COMMAND" in out and "Outputs:" in out


def test_version_names_fedsparse_and_what_its_results_depend_on(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("fedsparse 0.1.0 (")
    for package in ("flwr", "torch", "ray", "mlflow"):
        assert f"{package} {version(package)}" in line


def test_python_dash_m_fedsparse_is_the_command():
    done = subprocess.run([sys.executable, "-m", "fedsparse", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("fedsparse 0.1.0 (flwr ")


def test_a_finished_run_is_a_short_aligned_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = table("quickstart", finished(), f"sqlite:///{tmp_path / 'mlflow.db'}")
    head, *rows = text.splitlines()
    assert head == "quickstart: 2 rounds"
    starts = {re.match(r"  \S.*?  +(?=\S)", row).end() for row in rows}
    assert len(starts) == 1  # every value starts in the same column
    assert "  accuracy" in rows[0] and "0.9312 (centralised test set), loss 0.2194" in rows[0]
    assert "0.9287 weighted, 0.9296 mean, 0.9111 bottom 10%" in text
    assert "79.7 MB / 79.7 MB" in text and "205.9 GFLOPs" in text
    assert "23.4 s, of which rounds 3.5 s" in text
    assert "runs/quickstart-1" in text
    assert "run 6d63abc: mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "FAILED" not in text
    assert re.search(r"\n  FAILED +no round counted$",
                     table("q", finished(failure="no round counted"), ""))


def test_the_mlflow_line_says_where_the_run_is():
    assert mlflow_hint("http://127.0.0.1:5000", "r1") == "run r1 at http://127.0.0.1:5000"
    page = "http://h:5000/#/experiments/7/runs/r1?workflowType=machine_learning"
    assert mlflow_hint("http://h:5000/", "r1", "7") == page
    assert mlflow_hint("sqlite:////x.db", "r1", "7").endswith(
        ", then http://127.0.0.1:5000/#/experiments/7/runs/r1?workflowType=machine_learning")
    assert "the ServerApp's MLflow" in mlflow_hint("", "r1")
    assert mlflow_hint("sqlite:////elsewhere/m.db", "r1").endswith(
        "--backend-store-uri sqlite:////elsewhere/m.db")
    assert mlflow_hint("sqlite:////x.db", "") == "not tracked"


def test_quiet_is_one_line():
    line = one_line("quickstart", finished())
    assert line == ("quickstart: 2 rounds, accuracy 0.9312, uplink 79.7 MB, 23.4 s -> "
                    "runs/quickstart-1")


def test_the_progress_rate_counts_rounds_not_the_start_up():
    progress = Progress("x", 10, False, "starting")
    time.sleep(1.0)  # Flower, Ray and the actors starting
    progress({"event": "start", "first_round": 4})  # a resumed run: 3 rounds done before
    time.sleep(0.2)
    progress({"event": "round", "round": 4, "rounds": 10, "metrics": {"round_s": 0.2}})
    state = progress.bar.format_dict
    assert state["n"] == 4 and state["initial"] == 3
    assert state["elapsed"] < 0.9  # not the second of start-up
    progress({"event": "done"})
