"""Launch a scenario as a Flower run with ``flwr run``, on Ray simulation or on a SuperLink.

Simulation: a simulation-mode ``flower-superlink`` is started on a free loopback port for
this run alone (Flower's home and Ray's temp files under the working directory), the run is
submitted with ``flwr run <app> <connection> --stream``, and every process started is
stopped at the end. Its Ray is one of its own on this host, or an existing cluster
(``Launch.ray_cluster``), which the run joins and leaves running. Deployment: the same
``flwr run`` goes to an existing SuperLink. Every process is started under a supervisor
(``supervise.py``), so that nothing of a run outlives the CLI, even when the CLI is killed.

The Flower App submitted is a minimal one written under the working directory: a
``pyproject.toml`` whose components are ``strategies.server_app:app`` and
``clients.client_app:app``, imported from the installed fedsparse. The scenario reaches
the apps through Flower's run config. The ServerApp's progress events come back through
Flower's log stream; everything else in the stream goes to the run's ``flower.log``.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w

import fedsparse
from fedsparse import flower_log, supervise
from fedsparse.protocol import RUN_CONFIG_DEFAULTS
from fedsparse.runtime_env import process_env, state_dir
from fedsparse.scenario import RunSpec, Scenario, ScenarioError, toml_literal
from fedsparse.tracking import events

APP_NAME = "fedsparse-app"
CONNECTION = "fedsparse"
SUPERLINK_START_TIMEOUT_S = 60.0
HEALTH_POLL_S = 0.05  # a refused connection costs next to nothing: ask often
HANDOVER_TIMEOUT_S = 30.0  # for a supervisor (polling every 0.1 s) to take descriptors
RAY_START_TIMEOUT_S = 90.0
FINISHED_GRACE_S = 0.5  # to stop a finished run's processes before they are killed
ACTOR_TITLE = "ClientAppActor"  # in the process title of Flower's Ray client actors

EventHandler = Callable[[dict[str, Any]], None]


class LaunchError(RuntimeError):
    """The federation did not produce a result; the message points at the log."""


@dataclass
class Launch:
    """Everything one ``flwr run`` of a scenario needs."""

    scenario: Scenario
    run_dir: Path
    workdir: Path = field(default_factory=Path.cwd)
    superlink: str = ""  # address of an existing SuperLink; "" = start a simulation one
    # a simulation SuperLink shared with other runs (compare); None = one of its own
    simulation_link: SimulationLink | None = None
    ray_cluster: str = ""  # simulation: the Ray cluster it joins; "" = a Ray of its own
    insecure: bool = True
    root_certificates: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)  # run-config keys (protocol.py)
    pass_fds: tuple[int, ...] = ()  # kept open by every supervisor of the run (its lock)
    log_level: str = ""  # Flower's lines at or above it also go to the terminal ("": none)

    @property
    def log_path(self) -> Path:
        return self.run_dir / "flower.log"


def write_app(directory: Path) -> Path:
    """The minimal Flower App (FAB source): a pyproject naming fedsparse's components."""
    directory.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": APP_NAME, "version": fedsparse.__version__,
                    "description": "fedsparse ServerApp and ClientApp", "license": "Apache-2.0",
                    "dependencies": [f"fedsparse=={fedsparse.__version__}"]},
        "tool": {"flwr": {"app": {
            "publisher": "fedsparse",
            "components": {"serverapp": "strategies.server_app:app",
                           "clientapp": "clients.client_app:app"},
            "config": dict(RUN_CONFIG_DEFAULTS),
        }}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_supervised(command: list[str], *, pass_fds: tuple[int, ...] = (),
                     fd_socket: int | None = None, **popen: Any) -> subprocess.Popen:
    """Start ``command`` under a supervisor owned by this process, in a session of its own
    (a Ctrl-C at the terminal reaches only the CLI, which then stops the tree);
    ``fd_socket``: the supervisor's end of a socket this process hands it descriptors on
    (``supervise.Handed``).

    Call this from the main thread: the supervisor asks for SIGTERM when the *thread* that
    forked it exits (``PR_SET_PDEATHSIG``), so one started from a worker thread would stop
    when that thread ends, not when the CLI does.
    """
    inherited = pass_fds if fd_socket is None else (*pass_fds, fd_socket)
    return subprocess.Popen(supervise.command(os.getpid(), command, fd_socket),
                            pass_fds=inherited, start_new_session=True, **popen)


def stop_tree(*procs: psutil.Process | subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate processes and all their descendants; kill what is left after ``timeout``."""
    tree: list[psutil.Process] = []
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.pid)
            tree += [root, *root.children(recursive=True)]
    for p in tree:
        with suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    for proc in procs:
        if isinstance(proc, subprocess.Popen):
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``proc`` exits."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"{supervise.supervised(proc.args)[0]} exited with code "
                              f"{proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if 200 <= response.status < 300:
                    return
        except OSError:
            time.sleep(HEALTH_POLL_S)
    raise LaunchError(f"{url} did not answer within {timeout:.0f}s; see {log_path}")


@dataclass
class Handover:
    """A supervisor that is handed the descriptors of each run its tree serves while that
    run goes on (``supervise.Handed``): this process's end of its ``--fd-socket``."""

    supervisor: subprocess.Popen
    channel: socket.socket
    log_path: Path  # where its output goes, for the error

    def ask(self, message: bytes, fds: tuple[int, ...] = ()) -> None:
        socket.send_fds(self.channel, [message], list(fds))
        if self.channel.recv(16) != supervise.Handed.OK:
            raise LaunchError(f"the supervisor of {supervise.supervised(self.supervisor.args)[0]}"
                              f" did not take {message!r}; see {self.log_path}")

    def hold(self, fds: tuple[int, ...]) -> None:
        """Have the supervisor hold ``fds`` (a run folder's lock) until :meth:`drop`."""
        self.ask(supervise.Handed.HOLD, fds)

    def drop(self) -> None:
        self.ask(supervise.Handed.DROP)

    def tree(self) -> list[psutil.Process]:
        """Every process below the supervisor."""
        with suppress(psutil.NoSuchProcess):
            return psutil.Process(self.supervisor.pid).children(recursive=True)
        return []


@contextmanager
def supervised_with_handover(command: list[str], log_path: Path, *, env: dict[str, str],
                             cwd: Path, pass_fds: tuple[int, ...] = ()) -> Iterator[Handover]:
    """``command`` under a supervisor that can be handed descriptors, output to
    ``log_path``; stopped with its tree on exit."""
    channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, channel, theirs:
        proc = start_supervised(command, pass_fds=pass_fds, fd_socket=theirs.fileno(),
                                env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        theirs.close()
        channel.settimeout(HANDOVER_TIMEOUT_S)
        try:
            yield Handover(proc, channel, log_path)
        finally:
            stop_tree(proc)


@dataclass
class LocalRay:
    """A single-node Ray cluster on 127.0.0.1 that the simulations of several runs join one
    after the other (``fedsparse compare``), instead of each starting a Ray of its own.

    Nothing waits for it to start: a simulation's ``ray.init`` waits for its GCS, so Ray's
    3-4 s of start-up overlap the SuperLink's and the first run's own.
    :meth:`wait_started` says why it failed, if it did (``ray.init`` would wait minutes)."""

    address: str
    handover: Handover

    def wait_started(self, timeout: float = RAY_START_TIMEOUT_S,
                     stop: threading.Event | None = None) -> str:
        """Wait until ``ray start`` says it has started; "" then (or once ``stop`` is set),
        else why it did not."""
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.handover.log_path.read_text(errors="replace"):
            if stop is not None and stop.is_set():
                return ""
            if self.handover.supervisor.poll() is not None:
                return f"ray start exited with code {self.handover.supervisor.returncode}"
            if time.monotonic() > deadline:
                return f"ray start did not start a Ray within {timeout:.0f} s"
            time.sleep(HEALTH_POLL_S)
        return ""

    def end_run(self, timeout: float = 10.0) -> None:
        """Once a run's driver (its ``flwr-simulation``) is gone, wait for Ray to end that
        run's client actors; kill those left after ``timeout`` (a finished run's: Ray took
        1 s to end them)."""
        actors = _wait_gone([p for p in self.handover.tree() if ACTOR_TITLE in _cmdline(p)],
                            timeout)
        for proc in actors:
            with suppress(psutil.NoSuchProcess):
                proc.kill()
        _wait_gone(actors, timeout=10.0)


@contextmanager
def local_ray(workdir: Path, num_cpus: int, log_path: Path,
              pass_fds: tuple[int, ...] = ()) -> Iterator[LocalRay]:
    """``ray start --head`` on 127.0.0.1 with ``num_cpus`` CPUs, under a supervisor, its
    temp files where a run's own Ray keeps them; stopped with its tree on exit. It is
    started, not waited for (:class:`LocalRay`)."""
    port = free_port()
    command = ["ray", "start", "--head", "--block", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--include-dashboard", "false", "--disable-usage-stats"]
    with supervised_with_handover(command, log_path, env=process_env(workdir),
                                  cwd=workdir, pass_fds=pass_fds) as handover:
        yield LocalRay(f"127.0.0.1:{port}", handover)


@dataclass
class SimulationLink:
    """A simulation-mode SuperLink that runs are submitted to one after the other
    (``fedsparse compare``): started once, and after each run every process that run
    started (its ``flwr-simulation``, its Ray or its actors on the shared ``ray``) stopped,
    the SuperLink and its SuperExec (and the shared Ray) kept.

    Each run's descriptors (its run folder's lock) are handed to the supervisors of the
    SuperLink and of the shared Ray for as long as the run goes on (:meth:`hold`), so that
    the lock is held until the last process of the run is gone, as when a run has a
    SuperLink and a Ray of its own, even if the CLI is killed.
    """

    address: str
    handover: Handover
    ray: LocalRay | None = None  # the Ray its runs join; None: each starts its own (or
    # joins the Ray cluster of its run.ray_address)

    @property
    def log_path(self) -> Path:
        return self.handover.log_path

    def hold(self, fds: tuple[int, ...]) -> None:
        """Have the supervisors hold ``fds`` until :meth:`end_run`."""
        self.handover.hold(fds)
        if self.ray is not None:
            self.ray.handover.hold(fds)

    def stop(self, timeout: float) -> None:
        """Stop the SuperLink and the Ray with their trees, killing what is left after
        ``timeout`` seconds (once its runs are written and tracked, Ray's own exit on SIGTERM
        only costs time: 5 s at the end of a comparison)."""
        rays = [] if self.ray is None else [self.ray.handover.supervisor]
        stop_tree(self.handover.supervisor, *rays, timeout=timeout)

    def end_run(self, grace: float = 10.0) -> None:
        """Stop every process below the SuperLink but the SuperLink and its SuperExec (and
        the run's actors on the shared Ray), killing those left after ``grace`` seconds, then
        let go of the run's descriptors."""
        below: list[psutil.Process] = []
        with suppress(psutil.NoSuchProcess):
            below = psutil.Process(self.handover.supervisor.pid).children()
        kept = {p for p in below if "flower-superlink" in _cmdline(p)}
        for proc in list(kept):
            with suppress(psutil.NoSuchProcess):
                kept |= {c for c in proc.children() if "flower-superexec" in _cmdline(c)}
        run = [p for p in self.handover.tree() if p not in kept]
        for proc in run:
            with suppress(psutil.NoSuchProcess):
                proc.terminate()
        alive = _wait_gone(run, timeout=grace)
        for proc in alive:
            with suppress(psutil.NoSuchProcess):
                proc.kill()
        _wait_gone(alive, timeout=10.0)
        if self.ray is not None:
            self.ray.end_run(timeout=grace)
            self.ray.handover.drop()
        self.handover.drop()


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every one of ``procs`` has exited; those still running after ``timeout``.
    A zombie counts as exited: these are not this process's children, and the SuperExec
    leaves its ``flwr-simulation`` unreaped (``psutil.wait_procs`` waited the full timeout
    on it, twice, 20 s per compare arm)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _exited(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(HEALTH_POLL_S)
        alive = [p for p in alive if not _exited(p)]
    return alive


def _exited(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _cmdline(proc: psutil.Process) -> str:
    with suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


@contextmanager
def simulation_superlink(env: dict[str, str], log_path: Path, cwd: Path,
                         pass_fds: tuple[int, ...] = ()) -> Iterator[SimulationLink]:
    """A simulation-mode SuperLink on a free loopback port, stopped (with its tree) on exit."""
    port = free_port()
    command = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
    with supervised_with_handover(command, log_path, env=env, cwd=cwd,
                                  pass_fds=pass_fds) as handover:
        wait_http(f"http://127.0.0.1:{port}/health", handover.supervisor,
                  SUPERLINK_START_TIMEOUT_S, log_path)
        yield SimulationLink(f"127.0.0.1:{port}", handover)


@contextmanager
def shared_simulation_link(workdir: Path, ray_cluster: str, log_path: Path,
                           ray: LocalRay | None = None) -> Iterator[SimulationLink]:
    """A simulation SuperLink for several runs (:class:`SimulationLink`), its Flower home
    a folder of its own under the working directory's state folder, its log ``log_path``;
    its runs join the Ray cluster at ``ray_cluster``, or ``ray`` (which, on 127.0.0.1, they
    join as a run's own Ray is reached: ``runtime_env.LOCAL_RAY``)."""
    env = process_env(workdir, ray_cluster)
    if ray is not None:
        env["RAY_ADDRESS"] = ray.address
    env["FLWR_HOME"] = str(state_dir(workdir) / f"superlink-{secrets.token_hex(3)}")
    with simulation_superlink(env, log_path, workdir) as link:
        link.ray = ray
        yield link


def flower_config(home: Path, address: str, insecure: bool,
                  root_certificates: Path | None) -> None:
    """Flower's configuration under ``home``: one connection, ``CONNECTION``, to ``address``."""
    connection: dict[str, Any] = {"address": address}
    if insecure:
        connection["insecure"] = True
    elif root_certificates is not None:
        connection["root-certificates"] = str(root_certificates.resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def check_client_gpus(run: RunSpec, source: str) -> None:
    """Refuse, before anything starts, a simulation whose clients each need a share of a GPU
    (``run.client_gpus``) on a machine where torch sees no CUDA device: the Ray it starts
    would have no GPU to place them on (Flower 1.41 then sizes its actor pool at zero and
    stops the run with "ActorPool is empty", once Ray is up). Only for the Ray that a
    simulation starts on this machine: an existing cluster decides for itself."""
    if run.client_gpus == 0:
        return
    import torch

    if torch.cuda.device_count() > 0:
        return
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = "" if hidden is None else f" (CUDA_VISIBLE_DEVICES={hidden!r})"
    raise ScenarioError(source, [
        f"run.client_gpus = {run.client_gpus}: torch sees no CUDA device on this machine{why}, "
        f"so the Ray of a simulation here could place no client; set run.client_gpus = 0 to "
        f"train the clients on the CPU"])


def _federation_config(scenario: Scenario, ray_cluster: str) -> str:
    """The Simulation Engine's settings: Flower's ``init-args-*`` keys are ``ray.init``'s
    arguments, and a cluster's CPUs are its nodes' (``ray.init`` refuses ``num_cpus`` when
    it joins one); each client's actor asks for ``run.client_cpus`` on whichever node. The
    nodes are as many as a round contacts at once (``Scenario.simulated_nodes``)."""
    run = scenario.run
    config: dict[str, Any] = {"num-supernodes": scenario.simulated_nodes(),
                              "client-resources-num-cpus": run.client_cpus,
                              "client-resources-num-gpus": run.client_gpus,
                              "init-args-logging-level": "ERROR",
                              "init-args-log-to-driver": False}
    if not ray_cluster:
        config["init-args-num-cpus"] = run.cpus()
    return " ".join(f"{k}={toml_literal(v)}" for k, v in config.items())


def check_superlink(address: str, root_certificates: Path | None,
                    timeout: float = 10.0) -> None:
    """Fail early, saying why, when the SuperLink at ``address`` cannot be reached the way
    it is asked for (unreachable, TLS against plain HTTP or the reverse, an untrusted or
    mismatched certificate, a missing CA file)."""
    import ssl
    import urllib.error
    import urllib.request

    if root_certificates is not None and not root_certificates.is_file():
        raise LaunchError(f"--root-certificates {root_certificates}: no such file")
    scheme = "http" if root_certificates is None else "https"
    context = None if root_certificates is None else \
        ssl.create_default_context(cafile=str(root_certificates))
    url = f"{scheme}://{address}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            return
    except urllib.error.HTTPError:
        return  # it answered: it is there
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
    if isinstance(reason, ssl.SSLCertVerificationError):
        raise LaunchError(f"the SuperLink at {address} is not the one {root_certificates} "
                          f"vouches for: {reason.verify_message} (a certificate from another "
                          f"CA, or one whose names do not include {address.rsplit(':', 1)[0]})")
    if isinstance(reason, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(reason):
        raise LaunchError(f"the SuperLink at {address} speaks plain HTTP (an insecure "
                          f"SuperLink): drop --root-certificates")
    if root_certificates is None and _speaks_tls(address, timeout):
        raise LaunchError(f"the SuperLink at {address} speaks TLS: pass --root-certificates "
                          f"CA_PEM (or --deployment DIR)")
    raise LaunchError(f"the SuperLink at {address} is unreachable: {reason}")


def _speaks_tls(address: str, timeout: float) -> bool:
    """Whether a TLS handshake (trusting nothing) gets as far as a server certificate."""
    import ssl

    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host.strip("[]")):
            return True
    except ssl.SSLCertVerificationError:
        return True
    except (OSError, ValueError):
        return False


def run_flower(launch: Launch, on_event: EventHandler) -> dict[str, Any]:
    """Run the scenario; call ``on_event`` for each progress event; return the summary."""
    if launch.superlink:
        check_superlink(launch.superlink, None if launch.insecure else launch.root_certificates)
    launch.run_dir.mkdir(parents=True, exist_ok=True)
    env = process_env(launch.workdir, launch.ray_cluster)
    env["FLWR_HOME"] = str(launch.run_dir / ".flwr")
    app_dir = write_app(state_dir(launch.workdir) / "app")
    run_config = (launch.run_dir / "run_config.toml").resolve()
    settings = {**RUN_CONFIG_DEFAULTS, **launch.settings,
                "scenario": launch.scenario.to_toml(), "out-dir": _out_dir(launch),
                "federation": "deployment" if launch.superlink else "simulation"}
    run_config.write_text(tomli_w.dumps(settings))
    if launch.log_level == "DEBUG":
        env[flower_log.LOG_LEVEL_ENV] = "DEBUG"
    try:
        with _superlink(launch, env) as (address, ray):
            flower_config(Path(env["FLWR_HOME"]), address,
                          launch.insecure or not launch.superlink, launch.root_certificates)
            command = ["flwr", "run", str(app_dir), CONNECTION, "--stream",
                       "--run-config", str(run_config)]
            if not launch.superlink:
                command += ["--federation-config",
                            _federation_config(launch.scenario, launch.ray_cluster)]
            return _stream(command, env, launch, on_event, ray)
    finally:
        flower_log.strip_colours(launch.log_path)


def _out_dir(launch: Launch) -> str:
    """The run folder as the ServerApp must see it: a relative one given for a SuperLink
    stays relative (to the ServerApp's folder: in a ``fedsparse deploy`` federation its
    deployment folder), since the ServerApp runs on the SuperLink's host."""
    if launch.superlink and not launch.run_dir.is_absolute():
        return str(launch.run_dir)
    return str(launch.run_dir.resolve())


@contextmanager
def _superlink(launch: Launch, env: dict[str, str]) -> Iterator[tuple[str, LocalRay | None]]:
    """The SuperLink the run is submitted to, and the Ray of this host it shares with other
    runs (None: its own Ray, a user's cluster or a deployment)."""
    if launch.superlink:
        yield launch.superlink, None
    elif launch.simulation_link is not None:
        link = launch.simulation_link
        link.hold(launch.pass_fds)
        try:
            yield link.address, link.ray
        except BaseException:
            link.end_run()
            raise
        # Done: everything is written and tracked. flwr-simulation's own exit on SIGTERM
        # (Flower's exit handlers, leaving the shared Ray) took 3 s per arm, for nothing.
        link.end_run(grace=FINISHED_GRACE_S)
    else:
        with simulation_superlink(env, launch.log_path, launch.workdir,
                                  launch.pass_fds) as link:
            yield link.address, None
            # Done, as above: Flower's and Ray's own exit on SIGTERM took 3.1 s of the
            # quickstart; what is left after the grace is killed.
            stop_tree(link.handover.supervisor, timeout=FINISHED_GRACE_S)


def _stream(command: list[str], env: dict[str, str], launch: Launch,
            on_event: EventHandler, ray: LocalRay | None) -> dict[str, Any]:
    """Run ``flwr run --stream``: events to ``on_event``, every other line to the log file.
    A ``ray`` of this host that fails to start stops the run, saying so."""
    outcome: dict[str, Any] = {}
    with open(launch.log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = start_supervised(command, pass_fds=launch.pass_fds, env=env, cwd=launch.workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watch = _RayWatch(ray, proc)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                event = events.parse(line)
                if event is None:
                    line = flower_log.uncoloured(line)
                    log.write(line)
                    if flower_log.shown(line, launch.log_level):
                        _echo(line)
                    continue
                on_event(event)
                if event["event"] in ("done", "error"):
                    # Results are written and tracked; do not wait for Ray's slow shutdown.
                    outcome = event
                    break
        finally:
            watch.close()
            stop_tree(proc)
    if outcome.get("event") == "done":
        return outcome["summary"]
    if watch.failure:
        raise LaunchError(f"the Ray of this run did not start ({watch.failure}); see "
                          f"{watch.log_path}")
    if outcome.get("event") == "error":
        raise LaunchError(f"the federation failed: {outcome['message']} (log: {_logs(launch)})")
    raise LaunchError(f"the federation ended without a result (flwr run exit code "
                      f"{proc.returncode}){_last_error(launch.log_path)}; see {_logs(launch)}")


def _echo(line: str) -> None:
    """A line of Flower's log on the terminal, above the progress bar."""
    from tqdm import tqdm

    tqdm.write(line.rstrip("\n"), file=sys.stderr)


class _RayWatch:
    """Stops ``proc`` (``flwr run``) if ``ray`` fails to start: the simulation's
    ``ray.init`` would wait minutes for a GCS that never comes."""

    def __init__(self, ray: LocalRay | None, proc: subprocess.Popen) -> None:
        self.failure = ""
        self.log_path = None if ray is None else ray.handover.log_path
        self._stop = threading.Event()
        self._thread = None if ray is None else threading.Thread(
            target=self._watch, args=(ray, proc), daemon=True, name="ray-watch")
        if self._thread is not None:
            self._thread.start()

    def _watch(self, ray: LocalRay, proc: subprocess.Popen) -> None:
        self.failure = ray.wait_started(stop=self._stop)
        if self.failure:
            with suppress(psutil.NoSuchProcess):
                psutil.Process(proc.pid).terminate()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _logs(launch: Launch) -> str:
    """Where a run's Flower output is: its ``flower.log``, and the log of the SuperLink it
    shares (whose processes' own output goes there) if it shares one."""
    link = launch.simulation_link
    return str(launch.log_path) if link is None else f"{launch.log_path} and {link.log_path}"


def _last_error(log_path: Path) -> str:
    """The last exception line of a Flower log, to say why a run ended without a result."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()
             if line.strip() and ("Error: " in line or "Exception: " in line)]
    return f": {lines[-1]}" if lines else ""


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes as plain processes on 127.0.0.1.

    The Deployment Engine exactly as on real devices (insecure transport), each node
    serving ``partition-id=i num-partitions=num_nodes``; every process (and its SuperExec
    and ClientApp children) is stopped on exit, or when the process that started them dies
    (each runs under a supervisor). Use as a context manager; ``address`` is
    what ``fedsparse run --superlink`` takes.
    """

    def __init__(self, num_nodes: int, workdir: Path) -> None:
        self.num_nodes = num_nodes
        self.workdir = workdir
        self.home = state_dir(workdir) / f"deployment-{secrets.token_hex(3)}"
        self.env = process_env(workdir)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        (self.home / name).mkdir(parents=True, exist_ok=True)
        env = {**self.env, "FLWR_HOME": str(self.home / name)}
        with open(self.home / f"{name}.log", "a") as log:
            proc = start_supervised(command, env=env, cwd=self.workdir, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def __enter__(self) -> LocalDeployment:
        try:
            link = self._start("superlink", [
                "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                "--isolation", "subprocess", "--disable-runtime-dependency-installation"])
            wait_http(f"http://{self.address}/health", link, SUPERLINK_START_TIMEOUT_S,
                      self.home / "superlink.log")
            for i in range(self.num_nodes):
                self._start(f"supernode-{i}", [
                    "flower-supernode", "--insecure", "--superlink", self.address,
                    "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.processes):
            stop_tree(proc)
