"""Long-lived services owned by a deployment folder, not by the command that started them.

Each service runs under a supervisor (``fedsparse/supervise.py`` with ``--parent-pid 0``:
it follows no parent) in a session of its own, so it outlives ``fedsparse deploy up``; the
supervisor adopts whatever the service starts (Flower's SuperExec, ClientApp and ServerApp
processes), so stopping the supervisor stops the whole tree. A service's pidfile
``DIR/state/run/<service>.json`` holds the supervisor's pid and start time (a recycled pid
is never mistaken for it), its command and log, and the mark its whole tree carries in its
environment, by which ``stop`` finds what is left even of a service whose supervisor was
killed. ``DIR/state/deploy.lock`` serialises the commands that start and stop services
(``up``, ``down``, ``add-node``, ``remove-node``, ``register``).
"""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import secrets
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from fedsparse import supervise
from fedsparse.deploy.manifest import DeploymentError
from fedsparse.deploy.programs import CA, Program
from fedsparse.durable import write_bytes

STOP_TIMEOUT_S = 20.0
SERVICE_ENV = "FEDSPARSE_SERVICE"


@dataclass
class Daemon:
    """A started service: its supervisor's pid and start time, its command and log."""

    name: str
    pid: int
    started: float  # the supervisor's create_time (psutil), to tell a recycled pid apart
    argv: list[str]
    log: str
    token: str = ""  # the mark in its environment (``SERVICE_ENV``) its whole tree inherits

    def process(self) -> psutil.Process | None:
        """The supervisor, if it is still this service's; else None."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) < 0.05 and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.NoSuchProcess:
            pass
        return None


def user_kwargs(user: str) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``user`` with only that user's groups
    (``user=`` alone would keep root's group); {} for "" (the current user)."""
    if not user:
        return {}
    entry = pwd.getpwnam(user)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


def _slug(name: str) -> str:
    return name.replace(":", "-")


def run_dir(directory: Path) -> Path:
    return directory / "state" / "run"


def log_path(directory: Path, name: str) -> Path:
    return directory / "state" / "logs" / f"{_slug(name)}.log"


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the deployment's lock; refuse at once if another command holds it."""
    path = directory / "state" / "deploy.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeploymentError(f"{directory} is in use by another `fedsparse deploy` "
                                  f"command; try again when it is done") from None
        yield
    finally:
        os.close(fd)


def find(directory: Path, name: str) -> Daemon | None:
    """The recorded service ``name``, running or not; None if it never started here."""
    path = run_dir(directory) / f"{_slug(name)}.json"
    if not path.is_file():
        return None
    return Daemon(**json.loads(path.read_text()))


def recorded(directory: Path) -> list[Daemon]:
    """Every service that has a pidfile, in start order."""
    found = [Daemon(**json.loads(p.read_text())) for p in run_dir(directory).glob("*.json")]
    return sorted(found, key=lambda d: d.started)


def make_folders(directory: Path, program: Program) -> None:
    """The folders a service writes in that its program does not make itself (its Flower
    home, the SuperLink's database folder)."""
    if "FLWR_HOME" in program.env:
        Path(program.env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    if "--database" in program.argv:
        Path(program.argv[program.argv.index("--database") + 1]).parent.mkdir(
            parents=True, exist_ok=True)


def start(directory: Path, program: Program, env: dict[str, str],
          timeout: float = 120.0) -> Daemon:
    """Start ``program`` as a daemon (unless it already runs) and wait until it is ready."""
    existing = find(directory, program.name)
    if existing is not None and existing.process() is not None:
        return existing
    log = log_path(directory, program.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    token = f"{directory}#{program.name}#{secrets.token_hex(8)}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(supervised_argv(program), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, **program.env, SERVICE_ENV: token},
                                cwd=program.cwd or str(directory), close_fds=True)
    daemon = Daemon(program.name, proc.pid, psutil.Process(proc.pid).create_time(),
                    program.argv, str(log), token)
    run_dir(directory).mkdir(parents=True, exist_ok=True)
    write_bytes(run_dir(directory) / f"{_slug(program.name)}.json",
                json.dumps(asdict(daemon)).encode())
    try:
        _wait_ready(directory, program, proc, timeout)
    except BaseException:
        stop(directory, program.name)
        raise
    return daemon


def supervised_argv(program: Program) -> list[str]:
    """``program`` under a supervisor that follows no parent. The supervisor stays this
    user's (this interpreter may live where the service's user cannot go); only the service
    itself runs as its ``user``."""
    argv = ["runuser", "-u", program.user, "--", *program.argv] if program.user \
        else program.argv
    return supervise.command(0, argv)


def health_problem(directory: Path, url: str, timeout: float = 2.0) -> str:
    """Why ``url`` does not answer 2xx (trusting the deployment's CA); "" when it does."""
    context = ssl_context(directory) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return "" if 200 <= response.status < 300 else f"HTTP {response.status}"
    except OSError as err:  # refused, timed out, TLS failure, HTTP error status
        return str(err)


def _wait_ready(directory: Path, program: Program, proc: subprocess.Popen,
                timeout: float) -> None:
    """Until the health URL answers 2xx (or, without one, a second without exiting)."""
    deadline = time.monotonic() + (timeout if program.health_url else 1.0)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"{program.name} exited at start (code {proc.returncode})"
                                  f"{_tail(log_path(directory, program.name))}")
        if program.health_url and not health_problem(directory, program.health_url):
            return
        time.sleep(0.25)
    if program.health_url:
        raise DeploymentError(f"{program.name} did not answer {program.health_url} within "
                              f"{timeout:.0f}s{_tail(log_path(directory, program.name))}")


def ssl_context(directory: Path) -> ssl.SSLContext:
    """A client context that trusts the deployment's CA."""
    return ssl.create_default_context(cafile=str(directory / CA))


def _tail(log: Path, lines: int = 8) -> str:
    if not log.is_file():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return f"; last lines of {log}:\n  " + "\n  ".join(text) if text else ""


def members(daemon: Daemon) -> list[psutil.Process]:
    """Every process still carrying the service's mark (``SERVICE_ENV`` in its environment,
    which every descendant inherits): its tree even when its supervisor was killed and its
    descendants started sessions of their own."""
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error, OSError):
            if proc.environ().get(SERVICE_ENV) == daemon.token:
                found.append(proc)
    return found


def stop(directory: Path, name: str, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop service ``name`` and everything it started (even if its supervisor is gone);
    True if something of it was running."""
    daemon = find(directory, name)
    if daemon is None:
        return False
    proc = daemon.process()
    if proc is not None:
        proc.send_signal(signal.SIGTERM)  # the supervisor stops its tree, then exits
        with suppress(psutil.TimeoutExpired):
            proc.wait(timeout)
    left = members(daemon) if daemon.token else []
    for member in left:
        with suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(left, timeout=5)
    (run_dir(directory) / f"{_slug(name)}.json").unlink(missing_ok=True)
    return proc is not None or bool(left)
