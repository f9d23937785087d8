"""Run one command so that nothing it starts outlives the process that asked for it.

    python -m fedsparse.supervise --parent-pid PID -- CMD ARGS...

``fedsparse run`` starts every process of a run through this supervisor (``launch.py``):
the simulation SuperLink (whose SuperExec, flwr-simulation and Ray sit below it) and the
``flwr run`` client. The supervisor makes itself a child subreaper (Linux), so every
descendant of CMD stays in its process tree even when it daemonises or its own parent dies,
and it stops that whole tree (SIGTERM, SIGKILL after a grace period), reaps it and exits:

- when its parent (``--parent-pid``, the CLI) dies, even by SIGKILL: the kernel sends it
  SIGTERM (``PR_SET_PDEATHSIG``), and a poll of ``getppid()`` covers the moment before that
  was asked for; exit code 143 (``--parent-pid 0``: no parent to follow, for the
  long-lived services of a deployment, ``fedsparse/deploy/daemons.py``);
- when it receives SIGTERM or SIGINT: exit code 128 + the signal;
- when CMD exits, after stopping whatever CMD left behind: CMD's exit code (128 + N when a
  signal N ended CMD).

File descriptors the parent passes on (the run folder's lock) stay open here and are not
passed to CMD, so they are held exactly until the last process of the tree is gone. A
supervisor whose tree serves several runs one after the other (``fedsparse compare``'s
simulation SuperLink, ``launch.SimulationLink``) is handed each run's descriptors while it
runs, over a unix socket it inherits (``--fd-socket``, :class:`Handed`): held alike from
before that run starts anything until it is dropped, or until the tree is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.1
GRACE_S = 5.0
MODULE = "fedsparse.supervise"


def command(parent_pid: int, cmd: Sequence[str], fd_socket: int | None = None) -> list[str]:
    """The command line that runs ``cmd`` under a supervisor owned by ``parent_pid``
    (``fd_socket``: an inherited socket descriptors are handed on, :class:`Handed`)."""
    handing = [] if fd_socket is None else ["--fd-socket", str(fd_socket)]
    return [sys.executable, "-m", MODULE, "--parent-pid", str(parent_pid), *handing, "--",
            *cmd]


def supervised(argv: Sequence[str]) -> list[str]:
    """The command a supervisor's command line (see :func:`command`) runs."""
    return list(argv[list(argv).index("--") + 1:])


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}, {value}): {os.strerror(errno)}")


def own_descendants(follow_parent: bool = True) -> None:
    """Adopt every orphaned descendant and (``follow_parent``) get SIGTERM when the parent
    dies (Linux only; elsewhere the ``getppid()`` poll alone notices the parent's death)."""
    if sys.platform == "linux":
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        if follow_parent:
            _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the ending signal."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def reap() -> dict[int, int]:
    """Reap every child that has exited (as subreaper: orphans too); their exit codes."""
    codes: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return codes
        if pid == 0:
            return codes
        codes[pid] = _exit_code(status)


class Handed:
    """Descriptors the parent hands over while CMD runs, on the socket ``sock``: a message
    ``hold`` carries descriptors to keep open (as if passed at the start), ``drop`` closes
    every one held so far; each is answered ``ok`` once done, so the parent can wait for it.
    """

    HOLD, DROP, OK = b"hold", b"drop", b"ok"

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fds: list[int] = []

    def poll(self) -> None:
        """Act on every message waiting (none once the parent has closed its end)."""
        while self.sock.fileno() >= 0:
            try:
                message, fds, _, _ = socket.recv_fds(self.sock, 16, 16)
            except BlockingIOError:
                return
            if not message:  # the parent closed its end (or died): nothing more will come
                self.sock.close()
                return
            if message == self.DROP:
                for fd in self.fds:
                    os.close(fd)
                self.fds = []
            self.fds += fds
            with suppress(OSError):
                self.sock.send(self.OK)


def wait_for_end(child: int, parent_pid: int, received: list[int],
                 handed: Handed | None = None) -> int:
    """Poll until CMD exits, a signal arrives or the parent dies; the code to exit with."""
    while True:
        if handed is not None:
            handed.poll()
        code = reap().get(child)
        if code is not None:
            return code
        if received:
            return 128 + received[0]
        if parent_pid and os.getppid() != parent_pid:
            return 128 + signal.SIGTERM
        time.sleep(POLL_S)


def _signal_until_gone(signum: int, seconds: float) -> bool:
    """Send ``signum`` to every descendant, newcomers included, until none is left (True) or
    ``seconds`` have passed (False)."""
    deadline = time.monotonic() + seconds
    signalled: set[int] = set()
    while time.monotonic() < deadline:
        reap()
        tree = psutil.Process().children(recursive=True)
        if not tree:
            return True
        for proc in tree:
            if proc.pid not in signalled:
                with suppress(psutil.NoSuchProcess):
                    proc.send_signal(signum)
                signalled.add(proc.pid)
        time.sleep(POLL_S / 2)
    return False


def stop_descendants(grace: float = GRACE_S) -> None:
    """Terminate the whole tree; kill what is still there after ``grace`` seconds."""
    if not _signal_until_gone(signal.SIGTERM, grace):
        _signal_until_gone(signal.SIGKILL, grace)


def supervise(cmd: Sequence[str], parent_pid: int, grace: float = GRACE_S,
              fd_socket: int | None = None) -> int:
    """Run ``cmd`` until it ends, a signal arrives or the parent dies; stop the tree.
    ``fd_socket``: the descriptor of the socket descriptors are handed on (:class:`Handed`).
    """
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: received.append(number))
    own_descendants(follow_parent=parent_pid != 0)
    if parent_pid and os.getppid() != parent_pid:  # died before PR_SET_PDEATHSIG was set
        return 128 + signal.SIGTERM
    handed = None if fd_socket is None else Handed(socket.socket(fileno=fd_socket))
    child = subprocess.Popen(cmd)
    code = wait_for_end(child.pid, parent_pid, received, handed)
    if handed is not None:  # handed just before the end: held until the tree is gone too
        handed.poll()
    stop_descendants(grace)
    child.returncode = code  # reaped here, not by Popen
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent-pid", type=int, required=True,
                        help="stop everything when this process (the parent) is gone; "
                             "0: no parent to follow (a daemon)")
    parser.add_argument("--grace", type=float, default=GRACE_S,
                        help="seconds between SIGTERM and SIGKILL when stopping the tree")
    parser.add_argument("--fd-socket", type=int, metavar="FD",
                        help="an inherited unix socket on which the parent hands descriptors "
                             "to hold while CMD runs (see Handed)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given after --")
    return supervise(cmd, args.parent_pid, args.grace, args.fd_socket)


if __name__ == "__main__":
    sys.exit(main())
