"""The run folder's lock: one run at a time in a folder, held until every process of the run
is gone."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedsparse import cli
from fedsparse.launch import start_supervised, stop_tree
from fedsparse.run_lock import RunDirBusy, hold
from tests.conftest import DATA

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


def busy_message(run_dir: str, pid: int) -> str:
    return (f"fedsparse: {run_dir} is in use by pid {pid} (or by processes it started, "
            f"which are stopping); try again later\n")


def resumable(workdir: Path, name: str) -> Path:
    """A run folder as ``--resume`` finds it (its scenario), without any run behind it."""
    run_dir = workdir / "runs" / name
    run_dir.mkdir(parents=True)
    shutil.copy(DATA / "digits.toml", run_dir / "scenario.toml")
    return run_dir


def test_a_locked_run_folder_is_refused_at_once_naming_the_holder(workdir: Path, capsys):
    resumable(workdir, "r")
    with hold(Path("runs/r")):
        assert cli.main(["run", "--resume", "runs/r", "--quiet"]) == cli.EXIT_INVALID
        assert capsys.readouterr().err == busy_message("runs/r", os.getpid())
        assert cli.main(["run", str(DATA / "digits.toml"), "--run-dir", "runs/r",
                         "--quiet"]) == cli.EXIT_INVALID
        assert capsys.readouterr().err == busy_message("runs/r", os.getpid())
    with hold(Path("runs/r")):  # released: free again
        assert (workdir / "runs/r/.lock").read_text() == f"{os.getpid()}\n"


def test_the_lock_stays_held_until_the_supervisor_that_inherited_it_is_gone(tmp_path: Path):
    with hold(tmp_path) as fd:
        sup = start_supervised(SLEEP, pass_fds=(fd,))
    try:
        with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()} "), hold(tmp_path):
            pass
        deadline = time.monotonic() + 10
        while not psutil.Process(sup.pid).children():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (child,) = psutil.Process(sup.pid).children()
        lock = str(tmp_path / ".lock")
        assert lock in {f.path for f in psutil.Process(sup.pid).open_files()}
        assert lock not in {f.path for f in child.open_files()}  # CMD does not get it
    finally:
        stop_tree(sup)
    with hold(tmp_path):
        pass
