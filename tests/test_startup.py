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
PRESTART = "RAY_prestart_worker_first_driver"  # ray/common/ray_config_def.h


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


@pytest.mark.parametrize("key", [TASK_EVENTS, PRESTART])
def test_a_ray_of_the_runs_own_keeps_no_task_records_and_no_idle_workers_a_cluster_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str):
    monkeypatch.delenv(key, raising=False)
    assert process_env(tmp_path)[key] == "0"
    assert key not in process_env(tmp_path, "head:6379")
    monkeypatch.setenv(key, "1000")
    assert process_env(tmp_path)[key] == "1000"


def test_flwr_run_validates_the_app_without_importing_torch(tmp_path: Path):
    """``flwr run`` checks the app's components with ``find_spec``, which imports their
    packages: those import nothing (1.7 s of every start while ``strategies`` imported its
    modules, torch among them)."""
    from fedsparse.launch import write_app

    app = write_app(tmp_path / "app")
    statement = ("from flwr.cli.config_utils import load_and_validate\n"
                 f"config, _ = load_and_validate(__import__('pathlib').Path({str(app)!r}) / "
                 "'pyproject.toml')\nassert config is not None")
    assert imported_after(statement, ["torch", "strategies.server_app",
                                      "clients.client_app"]) == []


def test_every_plugin_module_registers_once_the_plugins_are_loaded():
    """Adding a strategy or a client program is adding one file: ``load_plugins`` imports
    every module of their packages (which themselves import nothing)."""
    packages = ["strategies", "clients.programs", "fedsparse.models"]
    probe = ("import importlib, pkgutil\n"
             "from fedsparse.registry import load_plugins\nload_plugins()\n"
             f"missing = [f'{{p}}.{{m.name}}' for p in {packages!r} for m in "
             "pkgutil.iter_modules(importlib.import_module(p).__path__)\n"
             "           if f'{p}.{m.name}' not in sys.modules]\nprint(*missing)")
    assert imported_after(probe, []) == []
    assert imported_after("import strategies, clients.programs", ["torch"]) == []
