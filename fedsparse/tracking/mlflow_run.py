"""MLflow access: a client whose store is ready, experiments by name, and a plain run handle.

A scenario run is mirrored to MLflow by ``tracking/mirror.py`` (params are the flattened
scenario, metrics per round with ``step = round``, artifacts at the end); :class:`MlflowRun`
is the handle for runs the CLI manages itself (a comparison's parent run). Everything goes
through an explicit :class:`mlflow.MlflowClient` (no global active-run state), so it is safe
inside a long-lived ServerApp process.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Mapping
from pathlib import Path

# A new SQLite store logs its schema migrations at INFO; they are not news to a user.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# MLflow 3's UI opens an experiment in its GenAI view (traces) unless the experiment says
# it is for model training; the tag holds when the experiment is created with it.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def client_for(tracking_uri: str):  # -> mlflow.MlflowClient
    """A client whose store is ready. A new SQLite store is created (schema migrations)
    under an exclusive lock on ``<db>.lock``, since two runs starting together on a fresh
    store would otherwise both migrate it and one fail, and aside, in a file renamed into
    place once migrated: a process killed while it migrates (a run stopped in its first
    seconds) leaves no half-migrated store, which every later run would fail to open."""
    from mlflow import MlflowClient

    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=tracking_uri or None)
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            for stale in db.parent.glob(f".{db.name}.*.new"):  # of a process killed then
                stale.unlink(missing_ok=True)
            fresh = db.with_name(f".{db.name}.{os.getpid()}.new")
            MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments(max_results=1)
            os.replace(fresh, db)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    return client


def experiment_id(tracking_uri: str, name: str, artifact_location: str = "") -> str:
    """Id of experiment ``name``, created (with ``artifact_location`` if given, and opening
    in MLflow's model-training view: :data:`EXPERIMENT_TAGS`) when missing."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location or None,
                                        tags=EXPERIMENT_TAGS)
    except MlflowException:  # created concurrently by another run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class MlflowRun:
    """An MLflow run the CLI manages itself."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = client_for(tracking_uri)
        self.run_id = run_id

    @classmethod
    def create(cls, tracking_uri: str, experiment: str, run_name: str,
               tags: Mapping[str, str]) -> MlflowRun:
        """A new run in experiment id ``experiment``."""
        run = client_for(tracking_uri).create_run(experiment, run_name=run_name,
                                                  tags=dict(tags))
        return cls(tracking_uri, run.info.run_id)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
