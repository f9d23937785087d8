"""The supervisor that owns every process of a run (fedsparse/supervise.py), without Flower:
plain Python processes that fork, daemonise and sleep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedsparse import supervise

# CMD for the supervisor: a child that double-forks a daemon (setsid) and then sleeps; both
# write their pid to <argv[1]>.child / <argv[1]>.daemon. The daemon's parent exits at once,
# so only the subreaper keeps it in the supervisor's tree. argv[2] is the child's exit code
# (it then exits at once instead of sleeping).
TREE = """
import os, sys, time
out = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open(out + ".daemon.tmp", "w").write(str(os.getpid()))
        os.rename(out + ".daemon.tmp", out + ".daemon")
        time.sleep(600)
    os._exit(0)
os.wait()
while not os.path.exists(out + ".daemon"):
    time.sleep(0.01)
open(out + ".child.tmp", "w").write(str(os.getpid()))
os.rename(out + ".child.tmp", out + ".child")
if len(sys.argv) > 2:
    sys.exit(int(sys.argv[2]))
time.sleep(600)
"""

# A parent that starts the supervisor around TREE, prints the supervisor's pid and sleeps.
PARENT = """
import os, subprocess, sys, time
from fedsparse import supervise
sup = subprocess.Popen(supervise.command(os.getpid(), [sys.executable, "-c", sys.argv[1],
                                                        sys.argv[2]]))
print(sup.pid, flush=True)
time.sleep(600)
"""


def wait_for(path: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return int(path.read_text())


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def seconds_until_gone(pids: list[int], timeout: float) -> float:
    started = time.monotonic()
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() - started < timeout, \
            f"still running after {timeout}s: {[p for p in pids if not gone(p)]}"
        time.sleep(0.02)
    return time.monotonic() - started


def tree_pids(out: Path) -> tuple[int, int]:
    return wait_for(Path(f"{out}.child")), wait_for(Path(f"{out}.daemon"))


def start(cmd: list[str], grace: float = supervise.GRACE_S) -> subprocess.Popen:
    """A supervisor owned by this test process."""
    return subprocess.Popen([sys.executable, "-m", supervise.MODULE, "--parent-pid",
                             str(os.getpid()), "--grace", str(grace), "--", *cmd])


def kill_all(pids: list[int]) -> None:
    """Leave nothing behind when an assertion failed half-way."""
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_command_round_trip():
    argv = supervise.command(42, ["flwr", "run", "--", "x"])
    assert argv[:6] == [sys.executable, "-m", "fedsparse.supervise", "--parent-pid", "42", "--"]
    assert supervise.supervised(argv) == ["flwr", "run", "--", "x"]


def test_parent_killed_stops_supervisor_child_and_daemon(tmp_path: Path):
    out = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, TREE, str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    sup = int(parent.stdout.readline())
    child, daemon = tree_pids(out)
    try:
        # the daemon's own parent exited: the subreaper adopted it
        assert psutil.Process(daemon).ppid() == sup
        assert psutil.Process(child).ppid() == sup
        parent.kill()
        parent.wait()
        assert seconds_until_gone([sup, child, daemon], timeout=5.0) < 5.0
    finally:
        kill_all([parent.pid, sup, child, daemon])
        parent.wait()
        parent.stdout.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_tree_and_exits_128_plus_signal(tmp_path: Path, signum: int):
    out = tmp_path / "pids"
    sup = start([sys.executable, "-c", TREE, str(out)])
    child, daemon = tree_pids(out)
    try:
        sup.send_signal(signum)
        assert sup.wait(timeout=5) == 128 + signum
        assert gone(child) and gone(daemon)
    finally:
        kill_all([sup.pid, child, daemon])


def test_exit_code_passes_through_after_leftovers_are_stopped(tmp_path: Path):
    out = tmp_path / "pids"
    sup = start([sys.executable, "-c", TREE, str(out), "3"])
    child, daemon = tree_pids(out)
    try:
        assert sup.wait(timeout=10) == 3
        assert gone(child) and gone(daemon)  # the daemon CMD left behind is stopped
    finally:
        kill_all([sup.pid, child, daemon])


def test_a_signal_that_ends_cmd_is_reported_as_128_plus_it():
    sup = start([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGUSR1)"])
    assert sup.wait(timeout=10) == 128 + signal.SIGUSR1


def test_what_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path):
    ready = tmp_path / "ready"
    stubborn = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "open(sys.argv[1], 'w').write('1')\ntime.sleep(600)")
    sup = start([sys.executable, "-c", stubborn, str(ready)], grace=0.5)
    wait_for(ready)
    (child,) = psutil.Process(sup.pid).children()
    try:
        started = time.monotonic()
        sup.terminate()
        assert sup.wait(timeout=5) == 128 + signal.SIGTERM
        assert 0.5 <= time.monotonic() - started < 3.0
        assert gone(child.pid)
    finally:
        kill_all([sup.pid, child.pid])


def test_a_parent_gone_before_the_watch_starts_nothing(tmp_path: Path):
    """--parent-pid is not the supervisor's parent (it died before the supervisor looked):
    CMD is never started."""
    marker = tmp_path / "started"
    not_the_parent = os.getppid()
    sup = subprocess.Popen([sys.executable, "-m", supervise.MODULE, "--parent-pid",
                            str(not_the_parent), "--", sys.executable, "-c",
                            f"open({str(marker)!r}, 'w')"])
    assert sup.wait(timeout=10) == 128 + signal.SIGTERM
    assert not marker.exists()
