"""Interrupts and orphans: the run folder's lock, Ctrl-C / SIGTERM on the CLI (MLflow status,
the resume command), and, on Ray, a killed or interrupted ``fedsparse run`` that leaves
nothing running behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedsparse import cli, supervise
from fedsparse.checkpoint import Checkpoint, finished_round
from fedsparse.experiments import Interrupted, run_scenario
from fedsparse.launch import LaunchError, start_supervised, stop_tree
from fedsparse.run_lock import RunDirBusy, hold
from fedsparse.scenario import load_scenario
from fedsparse.tracking.mirror import TrackedRun
from tests.conftest import DATA, flower_processes

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


def test_a_lock_handed_to_a_running_supervisor_is_held_until_dropped(tmp_path: Path):
    """``compare``'s shared SuperLink: each arm's lock is handed to its supervisor while the
    arm runs (``supervise.Handed``), and outlives the CLI's own descriptor until dropped."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sup = start_supervised(SLEEP, fd_socket=theirs.fileno())
    theirs.close()
    try:
        with hold(tmp_path) as fd:
            socket.send_fds(ours, [supervise.Handed.HOLD], [fd])
            assert ours.recv(16) == supervise.Handed.OK
        lock = str(tmp_path / ".lock")
        assert lock in {f.path for f in psutil.Process(sup.pid).open_files()}
        with pytest.raises(RunDirBusy), hold(tmp_path):
            pass
        ours.send(supervise.Handed.DROP)
        assert ours.recv(16) == supervise.Handed.OK
        assert lock not in {f.path for f in psutil.Process(sup.pid).open_files()}
        with hold(tmp_path):
            pass
        with hold(tmp_path) as fd:  # handed again, then the CLI dies: held until all is gone
            socket.send_fds(ours, [supervise.Handed.HOLD], [fd])
            assert ours.recv(16) == supervise.Handed.OK
        ours.close()
        time.sleep(0.3)  # the supervisor has seen the end of the socket, and kept the lock
        with pytest.raises(RunDirBusy), hold(tmp_path):
            pass
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=10)
        with hold(tmp_path):
            pass
    finally:
        ours.close()
        stop_tree(sup)


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


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_interrupt_the_cli(signum: int, code: int):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as caught, cli._signals_interrupt():
        os.kill(os.getpid(), signum)
        time.sleep(5)
    assert caught.value.signum == signum and caught.value.exit_code == code
    assert signal.getsignal(signum) is before


def test_the_interrupt_message_says_how_to_resume(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs/my run")
    assert cli.interrupted_message(Interrupted(signal.SIGINT)) == "fedsparse: interrupted"
    assert cli.interrupted_message(Interrupted(signal.SIGINT, run_dir)) == (
        "fedsparse: interrupted before round 1 finished; nothing to resume in runs/my run")
    Checkpoint(round=4, arrays={"w": np.zeros(1)}).save(run_dir)
    assert finished_round(run_dir) == 4
    assert cli.interrupted_message(Interrupted(signal.SIGTERM, run_dir)) == (
        "fedsparse: interrupted after round 4; resume with: "
        "fedsparse run --resume 'runs/my run'")
    assert cli.interrupted_message(Interrupted(signal.SIGINT, run_dir, "10.0.0.1:8000")) == (
        "fedsparse: interrupted; the run goes on at the SuperLink 10.0.0.1:8000")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store (creating one costs seconds)."""
    from fedsparse.tracking.mlflow_run import experiment_id

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    experiment_id(uri, "interrupts")
    return uri


@pytest.mark.parametrize(("error", "superlink", "status"), [
    (Interrupted(signal.SIGTERM), "", "KILLED"),
    (LaunchError("the federation ended without a result"), "", "FAILED"),
    (Interrupted(signal.SIGINT), "127.0.0.1:8000", "RUNNING"),  # goes on at the SuperLink
])
def test_an_ended_run_is_marked_once_its_federation_is_stopped(
        workdir: Path, monkeypatch, store: str, error: BaseException, superlink: str,
        status: str):
    from fedsparse.tracking.mirror import new_tracked_run, push

    scenario = load_scenario(DATA / "digits.toml")

    def federation(launch, on_event):
        # the folder is locked while the federation runs
        with pytest.raises(RunDirBusy), hold(launch.run_dir):
            pass
        record = new_tracked_run(scenario, tracking_uri=store, artifact_location="",
                                 run_name="r", parent_run_id="", fedsparse_run_id="x")
        record.save(launch.run_dir)  # as the ServerApp does before its clients are up
        push(record, launch.run_dir, [], reopen=True)
        raise error

    monkeypatch.setattr("fedsparse.experiments.run_flower", federation)
    with pytest.raises(type(error)) as caught:
        run_scenario(scenario, run_dir=Path("runs/x"), quiet=True, tracking_uri=store,
                     superlink=superlink)
    from mlflow import MlflowClient

    record = TrackedRun.load(Path("runs/x"))
    assert MlflowClient(tracking_uri=store).get_run(record.mlflow_run_id).info.status == status
    if isinstance(error, Interrupted):
        assert caught.value.run_dir == Path("runs/x") and caught.value.superlink == superlink
        assert caught.value.signum == error.signum
    with hold(Path("runs/x")):  # released
        pass


def test_the_serverapp_records_its_mlflow_run_before_the_clients_are_up(tmp_path: Path,
                                                                        store: str):
    """So that the CLI can mark it KILLED when it is interrupted during the warm-up."""
    from fedsparse.protocol import RUN_CONFIG_DEFAULTS
    from strategies.server_app import build_strategy, prepare

    scenario = load_scenario(DATA / "digits.toml")
    prepare(scenario, build_strategy(scenario),
            {**RUN_CONFIG_DEFAULTS, "tracking-uri": store, "fedsparse-run-id": "w"}, tmp_path)
    record = TrackedRun.load(tmp_path)
    assert record.tracking_uri == store and record.fedsparse_run_id == "w"
    assert record.experiment == scenario.tracking.experiment


def test_an_interrupted_comparison_marks_its_parent_run_killed(workdir: Path, monkeypatch,
                                                               capsys):
    def interrupted(scenario, *, run_dir, **_):
        raise Interrupted(signal.SIGINT, run_dir)

    monkeypatch.setattr("fedsparse.experiments.run_scenario", interrupted)
    assert cli.main(["compare", str(DATA / "digits.toml"), "--experiment", "cmp"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("fedsparse: interrupted before round 1 finished; nothing to "
                          "resume in runs/digits-test-")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    assert parent.info.run_name == "comparison" and parent.info.status == "KILLED"


# ---- on Ray: the real CLI as a subprocess -------------------------------------------------


@pytest.fixture
def start_cli(workdir: Path):
    """Starts ``fedsparse run`` of a 30-round digits federation as a user does; a CLI a
    failed test left running is killed (its supervisors stop the rest)."""
    started: list[subprocess.Popen] = []

    def start(run_dir: str) -> subprocess.Popen:
        with open(workdir / "cli.err", "w") as err:
            started.append(subprocess.Popen(
                [sys.executable, "-m", "fedsparse.cli", "run", str(DATA / "digits.toml"),
                 "--set", "run.rounds=30", "--run-dir", run_dir, "--quiet"],
                cwd=workdir, stdout=subprocess.DEVNULL, stderr=err))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
    seconds_until_no_process(workdir, timeout=10.0)


def wait_for_round_1(workdir: Path, run_dir: str, cli_proc: subprocess.Popen) -> int:
    """Wait until the run has checkpointed a round; the round it had then."""
    deadline = time.monotonic() + 180
    while (finished := finished_round(workdir / run_dir)) is None:
        assert cli_proc.poll() is None, (workdir / "cli.err").read_text()
        assert time.monotonic() < deadline, "no round finished in 180 s"
        time.sleep(0.1)
    return finished


def seconds_until_no_process(workdir: Path, timeout: float) -> float:
    started = time.monotonic()
    while left := flower_processes(workdir):
        if time.monotonic() - started > timeout:
            for pid in left:
                with suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
            pytest.fail(f"still running {timeout} s later: {left}")
        time.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.simulation
def test_a_killed_cli_leaves_no_process_and_the_run_resumes(workdir: Path, start_cli):
    cli_proc = start_cli("runs/k")
    at_kill = wait_for_round_1(workdir, "runs/k", cli_proc)
    names = {" ".join(psutil.Process(pid).cmdline()) for pid in flower_processes(workdir)}
    assert any("fedsparse.supervise" in n for n in names) and any("raylet" in n for n in names)
    cli_proc.kill()
    cli_proc.wait()
    gone_after = seconds_until_no_process(workdir, timeout=10.0)
    print(f"after SIGKILL of the CLI: round {at_kill}, last process gone {gone_after:.1f} s later")
    assert at_kill < 30
    assert cli.main(["run", "--resume", "runs/k", "--summary", "k.json", "--quiet"]) == 0
    summary = json.loads((workdir / "k.json").read_text())
    assert summary["rounds"] == 30
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    assert [row["round"] for row in Checkpoint.load(workdir / "runs/k").state["history"]] \
        == list(range(1, 31))
    assert not flower_processes(workdir)


@pytest.mark.simulation
def test_ctrl_c_stops_the_run_marks_it_killed_and_says_how_to_resume(workdir: Path, capsys,
                                                                      start_cli):
    cli_proc = start_cli("runs/i")
    wait_for_round_1(workdir, "runs/i", cli_proc)
    # a second run on the same folder is refused while the first one holds it
    assert cli.main(["run", "--resume", "runs/i", "--quiet"]) == cli.EXIT_INVALID
    assert capsys.readouterr().err == busy_message("runs/i", cli_proc.pid)
    cli_proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert cli_proc.wait(timeout=60) == 130
    stopped_after = time.monotonic() - started
    gone_after = seconds_until_no_process(workdir, timeout=3.0)
    finished = finished_round(workdir / "runs/i")
    print(f"SIGINT: CLI exited {stopped_after:.1f} s later after round {finished}, "
          f"last process gone {gone_after:.1f} s after that")
    assert stopped_after < 20.0
    assert finished is not None and 1 <= finished < 30
    assert (workdir / "cli.err").read_text().splitlines()[-1] == (
        f"fedsparse: interrupted after round {finished}; resume with: "
        f"fedsparse run --resume runs/i")
    from mlflow import MlflowClient

    run_id = TrackedRun.load(workdir / "runs/i").mlflow_run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"


@pytest.mark.simulation
def test_a_run_sigkilled_at_a_random_point_resumes_bit_identical(workdir: Path):
    """SCAFFOLD (client and server state: c_i, c, commit rounds) on Ray: killed with SIGKILL at
    a seeded random moment, resumed, it ends as the run that was never killed, bit for bit."""
    import random

    from safetensors.numpy import load_file

    from fedsparse.tracking.history import read_csv

    scenario = workdir / "scaffold.toml"
    scenario.write_text((DATA / "digits.toml").read_text()
                        .replace('program = "sgd"', 'program = "controlled_sgd"')
                        .replace("local_epochs = 3", "local_steps = 5")
                        .replace('name = "fedavg"', 'name = "scaffold"\naudit = true')
                        .replace("rounds = 3", "rounds = 6"))
    assert cli.main(["run", str(scenario), "--run-dir", "runs/ref", "--quiet"]) == 0
    rng = random.Random(15)
    after_round, delay = rng.randint(1, 4), rng.uniform(0.0, 1.5)
    with open(workdir / "cli.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fedsparse.cli", "run", str(scenario),
                                 "--run-dir", "runs/k", "--quiet"], cwd=workdir,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while (finished_round(workdir / "runs/k") or 0) < after_round:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait()
    seconds_until_no_process(workdir, timeout=10.0)
    assert (finished_round(workdir / "runs/k") or 0) < 6  # it was killed before the end
    assert cli.main(["run", "--resume", "runs/k", "--quiet"]) == 0
    timing = {"round_s", "train_s"}
    for name in ("metrics.csv", "clients.csv"):
        rows = [[{k: v for k, v in r.items() if k not in timing} for r in read_csv(
            workdir / "runs" / run / name)] for run in ("ref", "k")]
        assert rows[0] == rows[1], name
    reference, resumed = (load_file(workdir / "runs" / run / "model.safetensors")
                          for run in ("ref", "k"))
    assert all(reference[k].tobytes() == resumed[k].tobytes() for k in reference)
    assert all(row["audit_control_gap"] < 1e-6 for row in read_csv(workdir / "runs/k/metrics.csv"))
