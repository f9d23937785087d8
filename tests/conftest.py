"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory (runs/, mlflow.db, .fedsparse/ land here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def flower_task() -> None:
    """Flower messages can only be built inside a task; give the test process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def shipped_scenarios() -> list[Path]:
    """Every scenario file of scenarios/ and tests/data/ but the partial ones (``_*.toml``,
    only meant to be extended)."""
    files = sorted((REPO / "scenarios").rglob("*.toml")) + sorted(DATA.glob("*.toml"))
    return [f for f in files if not f.name.startswith("_")]


def digits_scenario(**sections: dict) -> str:
    """tests/data/digits.toml with some keys replaced (``section={key: value}``)."""
    import tomllib

    import tomli_w

    tree = tomllib.loads((DATA / "digits.toml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return tomli_w.dumps(tree)




def flower_processes(workdir: Path) -> list[int]:
    """Pids of the processes a run started in ``workdir`` (not those of other runs on the
    same machine): the supervisors, Flower's, and Ray's (binaries, scripts and workers)."""
    names = ("fedsparse.supervise", "flower-superlink", "flower-superexec", "flwr-simulation",
             "flwr run", "/ray/", "ray::")
    return [proc.pid for proc in psutil.process_iter(["cmdline", "cwd"])
            if proc.info["cwd"] and Path(proc.info["cwd"]).is_relative_to(workdir.resolve())
            and any(name in " ".join(proc.info["cmdline"] or []) for name in names)]
