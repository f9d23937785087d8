"""Running scenarios: one run through Flower, or several compared in one MLflow experiment.

What the ``fedsparse`` CLI does, as functions (the benchmarks call them too).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsparse.checkpoint import Checkpoint
from fedsparse.scenario import DataSpec, Scenario, ScenarioError, load_scenario
from fedsparse.tracking.history import Row

CLIENT_STATE = "client-state"  # the run folder's client state store (simulation)


def tracking_settings(workdir: Path, uri: str = "", deployment: bool = False) -> dict[str, str]:
    """Where the ServerApp tracks: ``uri`` if given; in deployment, the ServerApp's own
    MLFLOW_TRACKING_URI (""); else MLFLOW_TRACKING_URI or SQLite + ./mlruns in ``workdir``."""
    uri = uri or ("" if deployment else os.environ.get("MLFLOW_TRACKING_URI", ""))
    if uri or deployment:
        return {"tracking-uri": uri, "artifact-location": ""}
    workdir = workdir.resolve()
    return {"tracking-uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "artifact-location": (workdir / "mlruns").as_uri()}


def new_run_dir(scenario: Scenario) -> Path:
    """``runs/<name>-<time>-<random>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scenario.name}-{stamp}-{secrets.token_hex(2)}"


class Progress:
    """A progress bar over rounds and one short line per round (Flower chatter goes to a log)."""

    def __init__(self, label: str, rounds: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = None if quiet else tqdm(total=rounds, desc=label, unit="round",
                                           dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix_str("starting SuperLink, Ray and the clients")

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            return
        kind = event["event"]
        if kind == "start":
            self.bar.set_postfix_str("")
            self.bar.update(event["first_round"] - 1 - self.bar.n)
        elif kind == "round":
            self.bar.update(1)
            tqdm.write(format_round(event["round"], event["rounds"], event["metrics"]))
        elif kind in ("done", "error"):
            self.bar.close()


def format_round(server_round: int, rounds: int, m: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        return format(m[key], fmt) if key in m else "  -   "

    width = len(str(rounds))
    return (f"round {server_round:>{width}}/{rounds}  acc {num('accuracy', '.4f')}  "
            f"loss {num('loss', '.4f')}  fed acc {num('fed_accuracy_weighted', '.4f')}  "
            f"up {m.get('uplink_bytes', 0) / 1e6:7.2f} MB  "
            f"down {m.get('downlink_bytes', 0) / 1e6:7.2f} MB  {m['round_s']:5.1f} s")


def run_scenario(scenario: Scenario, *, run_dir: Path, quiet: bool, superlink: str = "",
                 root_certificates: Path | None = None, tracking_uri: str = "",
                 extra: dict[str, str] | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one scenario through Flower; return its summary (see ``tracking/summary.py``)."""
    from fedsparse.launch import Launch, run_flower

    if superlink:
        scenario.refuse_deployment(f"for --superlink {superlink}")
    workdir = Path.cwd()
    settings = {**tracking_settings(workdir, tracking_uri, deployment=bool(superlink)),
                **(extra or {}), "fedsparse-run-id": uuid.uuid4().hex}
    if resume:
        settings["resume-from"] = str(run_dir.resolve())
        settings["fedsparse-run-id"] = Checkpoint.load(run_dir).state["fedsparse_run_id"]
    if not superlink:  # simulated clients keep their state in the run folder
        settings["client-state-dir"] = str((run_dir / CLIENT_STATE).resolve())
    launch = Launch(scenario=scenario, run_dir=run_dir, workdir=workdir, superlink=superlink,
                    insecure=root_certificates is None, root_certificates=root_certificates,
                    settings=settings)
    if not quiet:
        where = f"SuperLink {superlink}" if superlink else "Ray simulation"
        print(f"fedsparse: {scenario.name} on {where}, {scenario.data.num_clients} clients, "
              f"{scenario.run.rounds} rounds -> {run_dir} (Flower log: {launch.log_path})",
              file=sys.stderr)
    started = time.perf_counter()
    progress = Progress(scenario.name, scenario.run.rounds, quiet)
    try:
        summary = run_flower(launch, progress)
    finally:
        if progress.bar is not None:
            progress.bar.close()
    summary["total_wall_s"] = time.perf_counter() - started
    summary["run_dir"] = str(run_dir)
    return summary



@dataclass
class Comparison:
    experiment: str
    parent_run_id: str
    summaries: dict[str, dict[str, Any]]
    histories: dict[str, list[Row]]
    report: Path


def compare(files: Sequence[Path], *, overrides: Sequence[str] = (), unset: Sequence[str] = (),
            experiment: str = "", out: Path | None = None, quiet: bool = True, superlink: str = "",
            root_certificates: Path | None = None, tracking_uri: str = "",
            target: float | None = None, reference: str = "") -> Comparison:
    """Run ``files`` one after the other into one MLflow experiment and write a report.

    All files are validated, and their data splits checked, before anything runs. The report
    (a table of final metrics, rounds to ``target`` accuracy, uplink reduction against the
    run named ``reference``, overlaid accuracy plots) goes to ``out`` and to a parent MLflow
    run.
    """
    from fedsparse.data.partition import check_partition
    from fedsparse.tracking.history import read_csv
    from fedsparse.tracking.mlflow_run import MlflowRun, experiment_id
    from fedsparse.tracking.report import write_report

    experiment = experiment or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [*overrides, f"tracking.experiment={json.dumps(experiment)}"]
    scenarios = [load_scenario(f, overrides, unset) for f in files]
    checked: set[tuple[DataSpec, int]] = set()
    for scenario, path in zip(scenarios, files, strict=True):
        if superlink:
            scenario.refuse_deployment(str(path))
        if (scenario.data, scenario.seed) not in checked:  # arms often share one split
            check_partition(scenario.data, scenario.seed, str(path))
            checked.add((scenario.data, scenario.seed))
    labels = [s.name for s in scenarios]
    if len(set(labels)) < len(labels):
        labels = [f"{s.name}[{f.stem}]" for s, f in zip(scenarios, files, strict=True)]
    if reference and reference not in labels:
        raise ScenarioError("--reference", [f"{reference!r} is none of the runs; allowed: "
                                            f"{', '.join(labels)}"])
    # the CLI's own view of the store (the ServerApps get tracking_uri, see run_scenario)
    settings = tracking_settings(Path.cwd())
    exp_id = experiment_id(settings["tracking-uri"], experiment, settings["artifact-location"])
    parent = MlflowRun.create(settings["tracking-uri"], exp_id, "comparison",
                              {"fedsparse.compare": ",".join(labels)})
    summaries: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[Row]] = {}
    out = out or Path("reports") / experiment
    try:
        for label, scenario in zip(labels, scenarios, strict=True):
            run_dir = new_run_dir(scenario)
            summaries[label] = run_scenario(
                scenario, run_dir=run_dir, quiet=quiet, superlink=superlink,
                root_certificates=root_certificates, tracking_uri=tracking_uri,
                extra={"parent-run-id": parent.run_id, "run-name": label})
            run = MlflowRun(settings["tracking-uri"], summaries[label]["mlflow_run_id"])
            histories[label] = read_csv(run.download("metrics.csv", run_dir / "tracked"))
        files_written = write_report(summaries, histories, out, f"Comparison: {experiment}",
                                     target=target, reference=reference)
        for path in files_written:
            parent.log_artifact(path, "plots" if path.suffix == ".png" else None)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return Comparison(experiment, parent.run_id, summaries, histories, out / "report.md")
