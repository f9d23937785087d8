"""One MLflow run per scenario run.

Params are the flattened, validated scenario; metrics are logged per round with
``step = round``; artifacts are the scenario file, the final model weights (safetensors),
the per-round metrics CSV, the per-client accounting CSV and the accuracy plots. The
tracker talks to MLflow through an explicit :class:`mlflow.MlflowClient` (no global
active-run state), so it is safe inside a long-lived ServerApp process.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsparse.scenario import Scenario

PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length

# A new SQLite store logs its schema migrations at INFO; they are not news to a user.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def _client(tracking_uri: str):  # -> mlflow.MlflowClient
    """A client whose store is ready. A new SQLite store is created (schema migrations)
    under an exclusive lock on ``<db>.lock``: two runs starting together on a fresh store
    would otherwise both migrate it, and one fails."""
    from mlflow import MlflowClient

    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=tracking_uri or None)
    with open(f"{tracking_uri.removeprefix('sqlite:///')}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    return client


def experiment_id(tracking_uri: str, name: str, artifact_location: str = "") -> str:
    """Id of experiment ``name``, created (with ``artifact_location`` if given) when missing."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location or None)
    except MlflowException:  # created concurrently by another run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MlflowRun:
    """A started (or resumed) MLflow run for one scenario."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = _client(tracking_uri)
        self.run_id = run_id

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, run_name: str,
               tags: Mapping[str, str]) -> MlflowRun:
        """A new run in experiment id ``experiment``."""
        run = _client(tracking_uri).create_run(experiment, run_name=run_name, tags=dict(tags))
        return cls(tracking_uri, run.info.run_id)

    @classmethod
    def start(cls, scenario: Scenario, *, tracking_uri: str, artifact_location: str = "",
              run_name: str = "", parent_run_id: str = "") -> MlflowRun:
        """The run of one scenario: tagged, with the flattened scenario as params."""
        exp = experiment_id(tracking_uri, scenario.tracking.experiment, artifact_location)
        tags = {"fedsparse.scenario": scenario.name,
                "fedsparse.fingerprint": scenario.fingerprint(),
                "mlflow.note.content": scenario.description, **scenario.tracking.tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tracked = cls.create(tracking_uri, exp, run_name or scenario.name, tags)
        tracked.log_params(scenario.flat())
        return tracked

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[start:start + 100])

    def log_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, server_round) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def download(self, artifact_path: str, dst: Path) -> Path:
        """Fetch one artifact of this run into ``dst``."""
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(self.run_id, status="RUNNING")
