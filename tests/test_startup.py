"""What a process pays before its first useful step (the modules it imports, how often it
asks for work) and what Ray keeps per task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsparse.runtime_env import process_env

POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # flwr/supercore/superexec/run_superexec.py
TASK_EVENTS = "RAY_task_events_report_interval_ms"  # ray/common/ray_config_def.h


def imported_after(statement: str, modules: list[str]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after ``statement``."""
    probe = f"import sys\n{statement}\nprint(*[m for m in {modules!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_a_client_process_imports_no_plotting_and_no_mlflow():
    """A Ray actor imports the ClientApp, which registers every strategy (and so imports the
    ServerApp's modules): plots and MLflow are for the ServerApp alone."""
    assert imported_after("import clients.client_app", ["matplotlib", "mlflow"]) == []


def test_the_superexec_asks_for_a_run_five_times_a_second_unless_told_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(POLL, raising=False)
    assert process_env(tmp_path)[POLL] == "0.2"
    monkeypatch.setenv(POLL, "2")
    assert process_env(tmp_path)[POLL] == "2"


def test_a_ray_of_the_runs_own_keeps_no_task_records_a_cluster_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(TASK_EVENTS, raising=False)
    assert process_env(tmp_path)[TASK_EVENTS] == "0"
    assert TASK_EVENTS not in process_env(tmp_path, "head:6379")
    monkeypatch.setenv(TASK_EVENTS, "1000")
    assert process_env(tmp_path)[TASK_EVENTS] == "1000"
