"""The run folder is the source of truth; its MLflow run is a mirror of it.

Everything a run tracks reaches its run folder first and durably (the checkpoint's history
after every round, the artifacts at the end); this module then copies to MLflow what MLflow
does not hold yet. Training never waits for it: :class:`BackgroundMirror` pushes from a thread,
each attempt bounded (one HTTP retry, a 10 s timeout unless the environment says otherwise),
retried with a growing pause while the server is away, and a bounded final flush at the end.
What could not be pushed stays in the run folder, and ``fedsparse sync RUN_DIR`` pushes it.

Each row is pushed exactly once whatever fails when: the MLflow run is found again by its
``fedsparse.run_id`` tag (never created twice), and every round's metrics carry the marker
``fedsparse_round`` in the same ``log_batch``, so the latest marker MLflow holds says which
rounds it has. Params, tags, artifacts and the final status are idempotent.
``tracking.json`` in the run folder says what the MLflow run is (experiment, name, params,
tags) and which artifacts and status it has received.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fedsparse.durable import write_bytes
from fedsparse.resume import RESUMABLE
from fedsparse.scenario import Scenario
from fedsparse.tracking.history import Row
from fedsparse.tracking.metric_names import mlflow_metric
from fedsparse.tracking.system_metrics import PREFIX as SYSTEM_PREFIX
from fedsparse.tracking.system_metrics import read_samples

TRACKING_FILE = "tracking.json"
ROUND_MARKER = "fedsparse_round"
RUN_ID_TAG = "fedsparse.run_id"
# Each push attempt gives up quickly; the mirror, not MLflow's client, decides when to retry.
# (And MLflow prints no "View run at" line into the ServerApp's output.)
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
MAX_PAUSE_S = 30.0
PARAM_VALUE_LIMIT = 6000  # MLflow's longest param value
log = logging.getLogger("fedsparse.tracking")


@dataclass
class TrackedRun:
    """What the MLflow run of a run folder is, and what it has received."""

    tracking_uri: str
    artifact_location: str
    experiment: str
    run_name: str
    fedsparse_run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    mlflow_run_id: str = ""
    mlflow_experiment_id: str = ""
    model_dir: str = ""  # the saved MLflow model to log (``tracking/mlflow_model.py``)
    model_round: int = 0  # the round whose model it is
    model_id: str = ""  # its MLflow logged model, once logged
    pushed_samples: int = 0  # system metric samples MLflow holds (tracking/system_metrics.py)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)  # (file, folder)
    pushed_artifacts: list[str] = field(default_factory=list)
    status: str = ""  # the final status, once the run has one
    pushed_status: str = ""

    def save(self, run_dir: Path) -> None:
        write_bytes(run_dir / TRACKING_FILE, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, run_dir: Path) -> TrackedRun:
        data = json.loads((run_dir / TRACKING_FILE).read_text())
        data["artifacts"] = [tuple(a) for a in data["artifacts"]]
        return cls(**data)


def tracked_at(run_dir: Path) -> str:
    """The tracking URI a run folder's ``tracking.json`` names ("" if it has none)."""
    return TrackedRun.load(run_dir).tracking_uri if (run_dir / TRACKING_FILE).is_file() else ""


def numeric(row: Row) -> dict[str, float]:
    """A round's metrics as MLflow takes them: numbers only, ``round`` is the step, under
    their grouped MLflow names (``fedsparse/tracking/metric_names.py``)."""
    return dict(mlflow_metric(k, float(v)) for k, v in row.items()
                if k != "round" and isinstance(v, int | float) and not isinstance(v, bool))


def push(record: TrackedRun, run_dir: Path, rows: Sequence[Row], reopen: bool,
         meta: bool = True) -> int:
    """Bring the MLflow run up to date with ``rows`` and the record's artifacts and status
    (``meta``: and its params and tags, which a running mirror pushes once, not after every
    round: one SQL transaction per tag); return the number of rounds pushed. Raises whatever
    MLflow raises when it is away."""
    from mlflow.entities import Metric, Param

    from fedsparse.tracking.mlflow_run import client_for, experiment_id

    client = client_for(record.tracking_uri)
    if not record.mlflow_run_id:
        exp = experiment_id(record.tracking_uri, record.experiment, record.artifact_location)
        record.mlflow_experiment_id = exp
        found = client.search_runs([exp], filter_string=f"tags.`{RUN_ID_TAG}` = "
                                                        f"'{record.fedsparse_run_id}'")
        record.mlflow_run_id = found[0].info.run_id if found else client.create_run(
            exp, run_name=record.run_name, tags={**record.tags, RUN_ID_TAG:
                                                 record.fedsparse_run_id}).info.run_id
        record.save(run_dir)
    run_id = record.mlflow_run_id
    params = [Param(k, v) for k, v in record.params.items()] if meta else []
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])
    for key, value in record.tags.items() if meta else ():
        client.set_tag(run_id, key, value)
    if reopen and not record.status:
        client.update_run(run_id, status="RUNNING")
    done = int(client.get_run(run_id).data.metrics.get(ROUND_MARKER, 0))
    pushed = 0
    for row in rows:
        if row["round"] > done:
            now = int(time.time() * 1000)
            metrics = {**numeric(row), ROUND_MARKER: float(row["round"])}
            client.log_batch(run_id, metrics=[Metric(k, v, now, int(row["round"]))
                                              for k, v in metrics.items()])
            pushed += 1
    samples = read_samples(run_dir)[record.pushed_samples:]
    for start in range(0, len(samples), 50):  # MLflow takes at most 1000 metrics a batch
        batch = samples[start:start + 50]
        client.log_batch(run_id, metrics=[
            Metric(SYSTEM_PREFIX + k, v, s["time_ms"], s["step"])
            for s in batch for k, v in s["metrics"].items()])
        record.pushed_samples += len(batch)
        record.save(run_dir)
    # Read the status first: finish() sets the artifacts and the model before the status,
    # so a status read here comes with the artifacts and the model it was set with.
    status = record.status
    artifacts, model_dir, model_round = list(record.artifacts), record.model_dir, \
        record.model_round
    for path, folder in artifacts:
        if path not in record.pushed_artifacts and (run_dir / path).exists():
            client.log_artifact(run_id, str(run_dir / path), folder)
            record.pushed_artifacts.append(path)
            record.save(run_dir)
    if model_dir and not record.model_id and (run_dir / model_dir).is_dir():
        from fedsparse.tracking.mlflow_model import log_saved_model

        experiment = record.mlflow_experiment_id or client.get_run(run_id).info.experiment_id
        model_id = log_saved_model(client, run_id, experiment, run_dir / model_dir, model_round)
        if record.model_dir == model_dir:  # not reset meanwhile (a new session's finish)
            record.model_id = model_id
            record.save(run_dir)
    if status and record.pushed_status != status:
        client.set_terminated(run_id, status=status)
        record.pushed_status = status
        record.save(run_dir)
    return pushed


def unreachable(tracking_uri: str, timeout: float = 3.0) -> str:
    """Why ``tracking_uri`` cannot be reached ("" if it can): a seconds-long pre-flight check
    (an MLflow server's ``/health``; a SQLite store's folder)."""
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health",
                                        timeout=timeout) as response:
                return "" if response.status == 200 else f"HTTP {response.status}"
        except OSError as err:
            return str(getattr(err, "reason", err))
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        return "" if os.access(folder, os.W_OK) else f"{folder} is not writable"
    return ""


class BackgroundMirror:
    """Pushes a running run to MLflow from a thread: :meth:`round_done` after each round's
    checkpoint, :meth:`finish` with the artifacts and status, :meth:`close` to flush."""

    def __init__(self, record: TrackedRun, run_dir: Path, rows: Callable[[], list[Row]]) -> None:
        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)
        self.record, self.run_dir, self.rows = record, run_dir, rows
        self.ready = 0  # rounds on disk, complete
        self.synced = threading.Event()  # MLflow holds everything asked for so far
        self._wake, self._stop = threading.Event(), threading.Event()
        self._lock, self._asked = threading.Lock(), 0  # requests, so a push knows it is stale
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-mirror", daemon=True)
        self._thread.start()

    def round_done(self, server_round: int) -> None:
        self.ready = server_round
        self._ask()

    def push_soon(self) -> None:
        """Something else is new in the run folder (a system metrics sample): push it."""
        self._ask()

    def finish(self, status: str, artifacts: Sequence[tuple[Path, str | None]],
               model_dir: Path | None = None, model_round: int = 0) -> None:
        """The run is over: push ``artifacts`` (files and their MLflow folders), the saved
        MLflow model in ``model_dir`` (the model of round ``model_round``) as the run's
        logged model, and ``status``."""
        self.record.artifacts = [(str(p.relative_to(self.run_dir)), f) for p, f in artifacts]
        self.record.model_id, self.record.model_round = "", model_round
        self.record.model_dir = str(model_dir.relative_to(self.run_dir)) if model_dir else ""
        self.record.status = status
        self.record.save(self.run_dir)
        self._ask()

    def _ask(self) -> None:
        with self._lock:
            self._asked += 1
            self.synced.clear()
        self._wake.set()

    def close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for everything to be pushed; whether it was."""
        self._wake.set()
        done = self.synced.wait(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=15)
        if not done:
            log.warning("MLflow has not received everything; the run folder holds it: push it "
                        "with fedsparse sync %s", self.run_dir)
        return done

    def _loop(self) -> None:
        pause, reopen = 1.0, True
        while not self._stop.is_set():
            self._wake.wait(pause if self._failing else None)
            self._wake.clear()
            with self._lock:
                asked = self._asked
            rows = [row for row in self.rows() if row["round"] <= self.ready]
            try:
                push(self.record, self.run_dir, rows, reopen, meta=reopen)
            except Exception as err:  # the server is away (or refuses): retry later
                if not self._failing:
                    log.warning("MLflow at %s is unreachable (%s): tracking stays in %s and is "
                                "pushed when it is back", self.record.tracking_uri,
                                type(err).__name__, self.run_dir)
                self._failing, pause = True, min(pause * 2, MAX_PAUSE_S)
                continue
            if self._failing:
                log.info("MLflow is back: pushed what was buffered")
            self._failing, pause, reopen = False, 1.0, False
            with self._lock:
                if self._asked == asked:  # nothing new was asked for during this push
                    self.synced.set()


def sync(run_dir: Path, status: str = "", override: bool = False) -> tuple[TrackedRun, int]:
    """Push everything ``run_dir`` holds that its MLflow run lacks (``fedsparse sync``: the
    rounds of its checkpoint, its artifacts, its status); a run that stopped without a final
    status gets ``status`` (with ``override``, whatever status it has: the CLI that
    interrupted a run knows better than the run it stopped). Returns the record and the
    rounds pushed."""
    from fedsparse.checkpoint import Checkpoint

    record = TrackedRun.load(run_dir)
    if status and (override or not record.status):
        record.status = status
        record.save(run_dir)
    try:
        rows = Checkpoint.load(run_dir).state["history"]
    except FileNotFoundError:  # stopped before its first round finished
        rows = []
    return record, push(record, run_dir, rows, reopen=False)


def new_tracked_run(scenario: Scenario, *, tracking_uri: str, artifact_location: str,
                    run_name: str, parent_run_id: str, fedsparse_run_id: str,
                    command: str = "") -> TrackedRun:
    """The MLflow run of a fresh run of ``scenario``: params = the flattened scenario except
    the keys a resume may change (``fedsparse/resume.py``), which are tags."""
    flat = scenario.flat()
    return TrackedRun(
        tracking_uri=tracking_uri, artifact_location=artifact_location,
        experiment=scenario.tracking.experiment, run_name=run_name or scenario.name,
        fedsparse_run_id=fedsparse_run_id,
        params={k: _text(v) for k, v in flat.items() if k not in RESUMABLE},
        tags=run_tags(scenario, parent_run_id, command))


def run_tags(scenario: Scenario, parent_run_id: str = "", command: str = "") -> dict[str, str]:
    """A run's tags: what identifies its scenario, the code that ran it (:func:`provenance`),
    the command that started it (this session's, on a resume), the user's tags, and the
    resumable keys."""
    flat = scenario.flat()
    tags = {"fedsparse.scenario": scenario.name, "fedsparse.fingerprint": scenario.fingerprint(),
            "mlflow.note.content": scenario.description, **provenance(),
            **scenario.tracking.tags, **{k: _text(flat[k]) for k in RESUMABLE if k in flat}}
    if command:
        tags["fedsparse.command"] = _text(command)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


@cache
def provenance() -> dict[str, str]:
    """The versions of fedsparse and of what its results depend on, and the git commit of
    the fedsparse checkout that runs (MLflow's own tag for it), where it is one."""
    from importlib.metadata import PackageNotFoundError, version

    import fedsparse

    tags = {"fedsparse.version": fedsparse.__version__, "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "fedsparse"}
    for package in ("flwr", "torch", "ray", "mlflow"):
        with suppress(PackageNotFoundError):
            tags[f"fedsparse.{package}_version"] = version(package)
    checkout = Path(fedsparse.__file__).resolve().parent.parent
    with suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--show-toplevel",
                                "HEAD"], capture_output=True, text=True, timeout=5)
        top, _, commit = found.stdout.strip().partition("\n")
        # fedsparse's own checkout, not a repository it is installed in (a venv inside one)
        if found.returncode == 0 and Path(top).resolve() == checkout:
            tags["mlflow.source.git.commit"] = commit
    return tags


def _text(value: Any) -> str:
    """A param or tag value as MLflow stores it (text, at most 6000 characters)."""
    return str(value)[:PARAM_VALUE_LIMIT]
