"""Running scenarios: one run through Flower, or several compared in one MLflow experiment.

What the ``fedsparse`` CLI does, as functions (the benchmarks call them too).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsparse.checkpoint import Checkpoint
from fedsparse.flower_log import strip_colours
from fedsparse.launch import (
    FINISHED_GRACE_S,
    Launch,
    SimulationLink,
    check_client_gpus,
    local_ray,
    run_flower,
    shared_simulation_link,
)
from fedsparse.run_lock import hold
from fedsparse.runtime_env import splits_dir
from fedsparse.scenario import DataSpec, Scenario, ScenarioError, load_scenario, sweep_overrides
from fedsparse.tracking.history import Row

CLIENT_STATE = "client-state"  # the run folder's client state store (simulation)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command. ``run_dir``: the run it stopped, if one was going
    (``superlink``: the SuperLink that run was submitted to, where it goes on)."""

    def __init__(self, signum: int, run_dir: Path | None = None, superlink: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir = run_dir
        self.superlink = superlink

    @classmethod
    def of(cls, err: KeyboardInterrupt, run_dir: Path, superlink: str) -> Interrupted:
        """``err`` as the interrupt of this run (a plain KeyboardInterrupt is a SIGINT)."""
        return cls(err.signum if isinstance(err, cls) else signal.SIGINT, run_dir, superlink)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def end_status(err: BaseException) -> str:
    """The MLflow status of a run that ``err`` ended: KILLED on an interrupt, else FAILED."""
    return "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"


NO_SYSTEM_METRICS = {"system-metrics-s": "0"}


def tracking_settings(workdir: Path, uri: str = "", deployment: bool = False) -> dict[str, str]:
    """Where the ServerApp tracks: ``uri`` if given; in deployment, the ServerApp's own
    MLFLOW_TRACKING_URI (""); else MLFLOW_TRACKING_URI or SQLite + ./mlruns in ``workdir``."""
    uri = uri or ("" if deployment else os.environ.get("MLFLOW_TRACKING_URI", ""))
    if uri or deployment:
        return {"tracking-uri": uri, "artifact-location": ""}
    workdir = workdir.resolve()
    return {"tracking-uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "artifact-location": (workdir / "mlruns").as_uri()}


def new_run_dir(scenario: Scenario, deployment: Path | None = None) -> Path:
    """``runs/<name>-<time>-<random>``, under the deployment folder for a deployed run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = (deployment / "runs").resolve() if deployment else Path("runs")
    return runs / f"{scenario.name}-{stamp}-{secrets.token_hex(2)}"


class Progress:
    """A progress bar over rounds and one short line per round (Flower chatter goes to a log)."""

    def __init__(self, label: str, rounds: int, quiet: bool, starting: str) -> None:
        from tqdm import tqdm

        self.bar = None if quiet else tqdm(total=rounds, desc=label, unit="round",
                                           dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix_str(starting)

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            return
        kind = event["event"]
        if kind == "start":
            # The rate counts from the first round: Flower's and Ray's start-up is not a
            # round's, and a resumed run's earlier rounds are not this session's.
            self.bar.reset()
            self.bar.initial = self.bar.n = self.bar.last_print_n = event["first_round"] - 1
            self.bar.set_postfix_str("")
        elif kind == "round":
            self.bar.update(1)
            tqdm.write(format_round(event["round"], event["rounds"], event["metrics"]))
        elif kind in ("done", "error"):
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def format_round(server_round: int, rounds: int, m: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        return format(m[key], fmt) if key in m else "  -   "

    width = len(str(rounds))
    return (f"round {server_round:>{width}}/{rounds}  acc {num('accuracy', '.4f')}  "
            f"loss {num('loss', '.4f')}  fed acc {num('fed_accuracy_weighted', '.4f')}  "
            f"up {m.get('uplink_bytes', 0) / 1e6:7.2f} MB  "
            f"down {m.get('downlink_bytes', 0) / 1e6:7.2f} MB  {m['round_s']:5.1f} s")


def refuse_unplaceable(scenario: Scenario, superlink: str, label: str = "") -> None:
    """ScenarioError, before anything is written or started, where the scenario cannot run
    where it is sent: fault injection on a SuperLink; on a Ray of the run's own, a GPU share
    this machine cannot give (a cluster decides where its GPUs are); a ``$RAY_ADDRESS`` that
    meets ``run.num_cpus``. ``label``: the scenario's file, where several are checked."""
    if superlink:
        scenario.refuse_deployment(label or f"for --superlink {superlink}")
    elif not scenario.run.ray_cluster(os.environ):
        check_client_gpus(scenario.run, f"{label} for a simulation on this machine".lstrip())


def run_scenario(scenario: Scenario, *, run_dir: Path, quiet: bool, superlink: str = "",
                 root_certificates: Path | None = None, tracking_uri: str = "",
                 extra: dict[str, str] | None = None, resume: bool = False,
                 simulation_link: SimulationLink | None = None,
                 log_level: str = "", command_line: str = "",
                 system_metrics: bool = True) -> dict[str, Any]:
    """Run one scenario through Flower (``resume``: continue ``run_dir`` from its checkpoint,
    ``fedsparse/resume.py`` says what may change); return its summary (see
    ``tracking/summary.py``), whose ``total_wall_s`` adds the time of a resumed run's
    earlier sessions up to their last finished round, as ``wall_s`` does. A simulation is
    submitted to ``simulation_link`` when given (a SuperLink shared with other runs, see
    ``launch.SimulationLink``), else to a SuperLink started for it alone. ``log_level``:
    Flower's log lines at or above it go to the terminal too (``fedsparse/flower_log.py``).
    ``command_line``: the command that started the run, an MLflow tag (``fedsparse.command``).
    ``system_metrics``: sample the machine's CPU, memory, disk and network into the run
    (``tracking/system_metrics.py``).

    The run folder is locked while the run goes on (``run_lock.RunDirBusy`` if it is in
    use). A simulation that ends on an interrupt or an error has its MLflow run marked KILLED
    or FAILED once its processes are stopped, so the ServerApp's own status cannot overwrite
    it; an interrupt is raised again as :class:`Interrupted`, naming the run folder.
    """
    refuse_unplaceable(scenario, superlink)
    ray_cluster = "" if superlink else scenario.run.ray_cluster(os.environ)
    if simulation_link is not None and simulation_link.ray is not None:
        ray_cluster = simulation_link.ray.address
    workdir = Path.cwd()
    settings = {**tracking_settings(workdir, tracking_uri, deployment=bool(superlink)),
                "run-name": run_dir.name,  # unique, and the run folder's: MLflow's runs table
                "command-line": command_line, **({} if system_metrics else NO_SYSTEM_METRICS),
                **(extra or {}), "fedsparse-run-id": uuid.uuid4().hex}
    if not superlink:  # simulated clients keep their state in the run folder
        settings["client-state-dir"] = str((run_dir / CLIENT_STATE).resolve())
        _preflight(settings["tracking-uri"], run_dir)
    with hold(run_dir) as lock:
        if not superlink:  # made here, so that a node that does not see it knows (README)
            Path(settings["client-state-dir"]).mkdir(exist_ok=True)
        prior_total_s = 0.0
        if resume:  # read under the lock: no other run is writing the checkpoint now
            checkpoint = Checkpoint.load(run_dir)
            settings["resume-from"] = str(run_dir.resolve())
            settings["fedsparse-run-id"] = checkpoint.state["fedsparse_run_id"]
            prior_total_s = float(checkpoint.state["total_wall_s"])
        settings |= {"cli-started-at": repr(time.time()),
                     "prior-total-wall-s": repr(prior_total_s)}
        launch = Launch(scenario=scenario, run_dir=run_dir, workdir=workdir,
                        superlink=superlink, ray_cluster=ray_cluster,
                        insecure=root_certificates is None,
                        root_certificates=root_certificates, settings=settings,
                        pass_fds=(lock,), simulation_link=simulation_link,
                        log_level=log_level)
        if not quiet:
            where = (f"SuperLink {superlink}" if superlink else
                     f"the Ray cluster at {ray_cluster}" if ray_cluster else "Ray simulation")
            print(f"fedsparse: {scenario.name} on {where}, {scenario.data.num_clients} "
                  f"clients, {scenario.run.rounds} rounds -> {run_dir} "
                  f"(Flower log: {launch.log_path})", file=sys.stderr)
        started = time.perf_counter()
        summary = _follow(launch, quiet)
    summary["total_wall_s"] = prior_total_s + time.perf_counter() - started
    summary["run_dir"] = str(run_dir)
    return summary


def _follow(launch: Launch, quiet: bool) -> dict[str, Any]:
    """``run_flower`` with a progress display; see ``run_scenario`` for how it ends."""
    scenario = launch.scenario
    try:
        starting = (f"submitted to {launch.superlink}, waiting for the nodes"
                    if launch.superlink else "starting SuperLink, Ray and the clients")
        with Progress(scenario.name, scenario.run.rounds, quiet, starting) as progress:
            return run_flower(launch, progress)
    except BaseException as err:
        if not launch.superlink:
            _mark_ended(launch.run_dir, err)
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted.of(err, launch.run_dir, launch.superlink) from err
        raise


def _mark_ended(run_dir: Path, err: BaseException) -> None:
    """Give the run's MLflow run the status ``err`` ended it with, with whatever rounds
    MLflow lacks (from the run folder); if MLflow fails, only say so (the run's own end is
    what the user must see, and ``fedsparse sync`` can push it later)."""
    from fedsparse.tracking.mirror import TRACKING_FILE, sync

    if not (run_dir / TRACKING_FILE).is_file():  # the ServerApp never got that far
        return
    status = end_status(err)
    try:
        sync(run_dir, status, override=True)
    except Exception as mlflow_err:
        print(f"fedsparse: could not mark the MLflow run {status} ({type(mlflow_err).__name__}"
              f"); push it later with fedsparse sync {run_dir}", file=sys.stderr)


def _preflight(tracking_uri: str, run_dir: Path) -> None:
    """Say at once when MLflow cannot be reached; the run goes on without it."""
    from fedsparse.tracking.mirror import unreachable

    reason = unreachable(tracking_uri)
    if reason:
        print(f"fedsparse: MLflow at {tracking_uri} is unreachable ({reason}); the run goes "
              f"on, its tracking is kept in {run_dir} and pushed when MLflow is back, or with "
              f"fedsparse sync {run_dir}", file=sys.stderr)


def _link_key(scenario: Scenario) -> tuple[str, int]:
    """Which runs of a comparison share a SuperLink: those on the same Ray cluster, or on a
    Ray of this host with the same CPUs (0 for a cluster's)."""
    cluster = scenario.run.ray_cluster(os.environ)
    return cluster, 0 if cluster else scenario.run.cpus()


def _simulation_links(scenarios: Sequence[Scenario], out: Path,
                      stack: ExitStack) -> dict[tuple[str, int], SimulationLink]:
    """One simulation SuperLink per :func:`_link_key` of ``scenarios`` (with a Ray of this
    host unless they join a cluster), logs in ``out``, stopped when ``stack`` closes."""
    links: dict[tuple[str, int], SimulationLink] = {}
    stack.callback(strip_colours, out / "superlink.log")  # last, once the links are stopped
    for key in dict.fromkeys(_link_key(s) for s in scenarios):
        cluster, cpus = key
        ray = None if cluster else stack.enter_context(local_ray(Path.cwd(), cpus,
                                                                 out / "ray.log"))
        links[key] = stack.enter_context(shared_simulation_link(
            Path.cwd(), cluster, out / "superlink.log", ray))
    return links


@dataclass
class Comparison:
    experiment: str
    parent_run_id: str
    summaries: dict[str, dict[str, Any]]
    histories: dict[str, list[Row]]
    report: Path


def compare(files: Sequence[Path], *, overrides: Sequence[str] = (), unset: Sequence[str] = (),
            sweeps: Sequence[str] = (), experiment: str = "", out: Path | None = None,
            quiet: bool = True, superlink: str = "",
            root_certificates: Path | None = None, tracking_uri: str = "",
            target: float | None = None, reference: str = "",
            log_level: str = "", command_line: str = "",
            system_metrics: bool = True) -> Comparison:
    """Run ``files`` one after the other into one MLflow experiment and write a report.
    ``sweeps`` (``KEY=[V1, V2, ...]``) run each file once per combination of the swept
    values; ``overrides`` apply to every run.

    All files are validated, and their data splits checked, before anything runs. In
    simulation the runs share one SuperLink and, unless they join a Ray cluster, one Ray on
    this host (one of each per Ray cluster and CPU budget), started before the first run and
    stopped after the last, their logs ``superlink.log`` and ``ray.log`` in ``out``; each
    run still starts (and stops) its own ``flwr-simulation`` and client actors. The report
    (a table of final metrics and of the scenario keys that differ, rounds to ``target``
    accuracy, uplink reduction against the run labelled ``reference``, overlaid plots) goes
    to ``out`` and to a parent MLflow run. A run's label is its scenario's name, with the
    values that tell it apart from runs of the same name (``tracking/runs.py``).
    """
    from fedsparse.data.partition import check_partition
    from fedsparse.tracking.history import read_csv
    from fedsparse.tracking.mirror import unreachable
    from fedsparse.tracking.mlflow_run import MlflowRun, experiment_id
    from fedsparse.tracking.report import write_report
    from fedsparse.tracking.runs import differences
    from fedsparse.tracking.runs import labels as run_labels

    experiment = experiment or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [*overrides, f"tracking.experiment={json.dumps(experiment)}"]
    arms = [(f, swept) for f in files for swept in sweep_overrides(sweeps)]
    scenarios = [load_scenario(f, [*overrides, *swept], unset) for f, swept in arms]
    checked: set[tuple[DataSpec, int]] = set()
    for scenario, (path, _) in zip(scenarios, arms, strict=True):
        refuse_unplaceable(scenario, superlink, str(path))  # before any arm runs
        if (scenario.data, scenario.seed) not in checked:  # arms often share one split
            check_partition(scenario.data, scenario.seed, str(path), splits_dir(Path.cwd()))
            checked.add((scenario.data, scenario.seed))
    params = [{k: str(v) for k, v in s.flat().items()} for s in scenarios]
    labels = run_labels([s.name for s in scenarios], params,
                        [f"{f.stem}-{i}" for i, (f, _) in enumerate(arms, 1)])
    if reference and reference not in labels:
        raise ScenarioError("--reference", [f"{reference!r} is none of the runs; allowed: "
                                            f"{', '.join(labels)}"])
    out = out or Path("reports") / experiment
    with ExitStack() as links_open:
        # Started first: their start-up overlaps MLflow's (the experiment, the parent run).
        links = {} if superlink else _simulation_links(scenarios, out, links_open)
        # the CLI's own view of the store (the ServerApps get tracking_uri, see run_scenario)
        settings = tracking_settings(Path.cwd())
        reason = unreachable(settings["tracking-uri"])
        if reason:
            from fedsparse.launch import LaunchError

            raise LaunchError(f"compare needs its MLflow experiment, and MLflow at "
                              f"{settings['tracking-uri']} is unreachable ({reason})")
        exp_id = experiment_id(settings["tracking-uri"], experiment,
                               settings["artifact-location"])
        parent = MlflowRun.create(settings["tracking-uri"], exp_id, "comparison",
                                  {"fedsparse.compare": ",".join(labels)})
        summaries: dict[str, dict[str, Any]] = {}
        histories: dict[str, list[Row]] = {}
        try:
            for label, scenario in zip(labels, scenarios, strict=True):
                run_dir = new_run_dir(scenario)
                summaries[label] = run_scenario(
                    scenario, run_dir=run_dir, quiet=quiet, superlink=superlink,
                    root_certificates=root_certificates, tracking_uri=tracking_uri,
                    extra={"parent-run-id": parent.run_id,  # the label and the folder's id
                           "run-name": f"{label}-{run_dir.name.rsplit('-', 1)[-1]}"},
                    simulation_link=links.get(_link_key(scenario)), log_level=log_level,
                    command_line=command_line, system_metrics=system_metrics)
                histories[label] = read_csv(run_dir / "metrics.csv")
            for link in links.values():  # every run is written and tracked
                link.stop(timeout=FINISHED_GRACE_S)
            files_written = write_report(summaries, histories, out, f"Comparison: {experiment}",
                                         target=target, reference=reference,
                                         params=differences(labels, params))
            for path in files_written:
                parent.log_artifact(path, "plots" if path.suffix == ".png" else None)
        except BaseException as err:
            parent.finish(end_status(err))
            raise
    parent.finish()
    return Comparison(experiment, parent.run_id, summaries, histories, out / "report.md")
