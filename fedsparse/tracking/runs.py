"""Runs that exist, read back for ``fedsparse ls``, ``show`` and ``report``: from a run folder
(the source of truth, finished or not) or from an MLflow run (by its id, or every run of an
experiment), without running anything.

A folder's rounds come from ``metrics.csv`` once the run has finished, else from its latest
checkpoint; an MLflow run's from its metric histories, under the grouped names or the plain
ones of runs tracked before the grouping (``tracking/metric_names.py``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsparse.checkpoint import Checkpoint, finished_round
from fedsparse.durable import CorruptFile
from fedsparse.resume import RESUMABLE
from fedsparse.run_lock import in_use
from fedsparse.scenario import parse_scenario
from fedsparse.tracking.history import Row, read_csv
from fedsparse.tracking.metric_names import plain_metric
from fedsparse.tracking.mirror import ROUND_MARKER
from fedsparse.tracking.summary import summarize
from fedsparse.tracking.system_metrics import PREFIX as SYSTEM_PREFIX

SCENARIO, SUMMARY, METRICS = "scenario.toml", "summary.json", "metrics.csv"
# Keys that differ between runs without saying how they differ.
NOT_COMPARED = ("description", "tracking.experiment")


class RunNotFound(LookupError):
    """No run folder, MLflow run or experiment of that name."""


@dataclass
class RunView:
    """A run as ``ls``, ``show`` and ``report`` see it."""

    name: str  # the scenario's name
    where: str  # its run folder, or its MLflow run id
    status: str  # FINISHED, FAILED, RUNNING, KILLED, or STOPPED (a folder that can resume)
    params: dict[str, str]  # the flattened scenario, values as MLflow holds them
    summary: dict[str, Any]  # summary.json, or what the rounds so far give
    history: list[Row] = field(default_factory=list)
    scenario_text: str = ""

    @property
    def rounds(self) -> int:
        return int(self.history[-1]["round"]) if self.history else 0

    @property
    def planned_rounds(self) -> int:
        return int(float(self.params.get("run.rounds", 0)))


def is_run_folder(path: Path) -> bool:
    return (path / SCENARIO).is_file()


def run_folders(root: Path) -> list[Path]:
    """The run folders in ``root`` (itself one, or holding them), oldest first."""
    if is_run_folder(root):
        return [root]
    found = [p for p in root.iterdir() if is_run_folder(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def from_folder(run_dir: Path) -> RunView:
    """A run folder, finished or not (:class:`RunNotFound` when it is none)."""
    if not is_run_folder(run_dir):
        raise RunNotFound(f"{run_dir}: no run folder: it has no {SCENARIO}")
    text = (run_dir / SCENARIO).read_text()
    scenario = parse_scenario(text, source=str(run_dir / SCENARIO))
    params = {k: str(v) for k, v in scenario.flat().items()}
    summary: dict[str, Any] = {}
    finished = json.loads((run_dir / SUMMARY).read_text()) if (run_dir / SUMMARY).is_file() \
        else None
    if finished is not None and finished_round(run_dir) in (None, finished.get("rounds")):
        summary = finished
        history = read_csv(run_dir / METRICS) if (run_dir / METRICS).is_file() else []
        status = "FAILED" if summary.get("failure") else "FINISHED"
    else:  # not finished, or resumed past the end of an earlier session
        try:
            history = list(Checkpoint.load(run_dir).state.get("history", []))
        except (FileNotFoundError, CorruptFile):
            history = []
        status = "RUNNING" if in_use(run_dir) else "STOPPED"
        if history:
            summary = summarize(history, 0.0, "")
    return RunView(scenario.name, str(run_dir), status, params, summary, history, text)


def _mlflow_history(client: Any, run: Any) -> list[Row]:
    """A run's rounds from its metric histories (step = round), under their plain names;
    the mirror's round marker and the system metrics (step = sample) are no round's."""
    rows: dict[int, Row] = {}
    for key in run.data.metrics:
        if key == ROUND_MARKER or key.startswith(SYSTEM_PREFIX):
            continue
        for metric in client.get_metric_history(run.info.run_id, key):
            name, value = plain_metric(key, metric.value)
            rows.setdefault(metric.step, {"round": metric.step})[name] = value
    return [rows[step] for step in sorted(rows)]


def _artifact_text(client: Any, run_id: str, path: str) -> str:
    """The text of an artifact of the run, "" when it has none by that name."""
    names = {a.path for a in client.list_artifacts(run_id)}
    if path not in names:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text()


def from_mlflow(client: Any, run: Any) -> RunView:
    """An MLflow run (``client``: an ``mlflow.MlflowClient``, ``run``: one of its runs)."""
    tags = run.data.tags
    params = {**run.data.params, **{k: tags[k] for k in RESUMABLE if k in tags}}
    history = _mlflow_history(client, run)
    summary_text = _artifact_text(client, run.info.run_id, SUMMARY)
    summary = json.loads(summary_text) if summary_text else (
        summarize(history, 0.0, run.info.run_id) if history else {})
    summary.setdefault("mlflow_run_id", run.info.run_id)
    name = tags.get("fedsparse.scenario") or params.get("name") or run.info.run_name
    return RunView(name, run.info.run_id, run.info.status, params, summary, history,
                   _artifact_text(client, run.info.run_id, SCENARIO))


def mlflow_client(tracking_uri: str) -> Any:
    """A client of the store at ``tracking_uri``, which must exist (reading runs back never
    creates a store) and answer (:class:`RunNotFound` says why not)."""
    from fedsparse.tracking.mirror import unreachable
    from fedsparse.tracking.mlflow_run import client_for

    sqlite = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") \
        else ""
    if sqlite and not Path(sqlite).is_file():
        raise RunNotFound(f"no MLflow store at {tracking_uri} (--tracking-uri, or "
                          f"MLFLOW_TRACKING_URI, says which)")
    reason = unreachable(tracking_uri)
    if reason:
        raise RunNotFound(f"MLflow at {tracking_uri} is unreachable ({reason})")
    return client_for(tracking_uri)


def find(reference: str, tracking_uri: str) -> RunView:
    """A run folder, else an MLflow run id in the store at ``tracking_uri``."""
    path = Path(reference)
    if path.is_dir():
        return from_folder(path)
    from mlflow.exceptions import MlflowException

    try:
        client = mlflow_client(tracking_uri)
        return from_mlflow(client, client.get_run(reference))
    except (MlflowException, RunNotFound) as err:
        raise RunNotFound(f"{reference}: no run folder, and no MLflow run of that id: "
                          f"{str(err).splitlines()[0]}") from None


def experiment_runs(tracking_uri: str, experiment: str) -> list[RunView]:
    """The runs of MLflow experiment ``experiment``, oldest first, less the parent runs of
    ``fedsparse compare`` (which hold a report, not rounds)."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise RunNotFound(f"no MLflow experiment {experiment!r} at {tracking_uri}; there "
                          f"are: {', '.join(names) or 'none'}")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"],
                              max_results=10_000)
    return [from_mlflow(client, run) for run in runs if "fedsparse.compare" not in run.data.tags]


def differing(params: Sequence[Mapping[str, str]]) -> list[str]:
    """The scenario keys whose values are not the same in every run (a key a run lacks
    counts as its own value), in the order they first appear."""
    keys = list(dict.fromkeys(k for p in params for k in p))
    return [k for k in keys if k not in NOT_COMPARED and len({p.get(k) for p in params}) > 1]


def differences(labels: Sequence[str],
                params: Sequence[Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Per run label, the values of the keys that differ between the runs (:func:`differing`;
    "-" where a run lacks the key): the report's table of what differs."""
    keys = differing(params)
    return {label: {k: p.get(k, "-") for k in keys}
            for label, p in zip(labels, params, strict=True)}


def labels(names: Sequence[str], params: Sequence[Mapping[str, str]],
           ids: Sequence[str]) -> list[str]:
    """One label per run for tables and legends: the scenario's name, with the values that
    tell apart runs of the same name (``digits client.lr=0.01``), then the run's ``ids``
    where even those are the same."""
    keys = [k for k in differing(params) if k != "name"]
    out = []
    for name, values in zip(names, params, strict=True):
        twins = [p for n, p in zip(names, params, strict=True) if n == name]
        apart = [k for k in keys if len({p.get(k) for p in twins}) > 1]
        out.append(" ".join([name, *(f"{k}={values.get(k, '-')}" for k in apart)]))
    if len(set(out)) < len(out):
        out = [f"{label} [{i}]" for label, i in zip(out, ids, strict=True)]
    if len(set(out)) < len(out):  # even the ids' ends: number them
        out = [f"{label} #{n}" for n, label in enumerate(out, 1)]
    return out


def view_labels(views: Sequence[RunView]) -> list[str]:
    """:func:`labels` of runs read back, told apart last by their folder's or run id's end."""
    return labels([v.name for v in views], [v.params for v in views],
                  [Path(v.where).name[-4:] for v in views])


def status_line(view: RunView) -> str:
    """FINISHED, or how far a run that has not finished got (``STOPPED after round 3``)."""
    if view.status in ("STOPPED", "RUNNING", "KILLED") and view.where and Path(view.where).is_dir():
        done = finished_round(Path(view.where))
        return f"{view.status} after round {done}" if done else f"{view.status} before round 1"
    return view.status
