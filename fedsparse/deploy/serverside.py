"""What the ServerApp of a fedsparse deployment takes from its deployment folder.

The SuperLink of ``fedsparse deploy up`` starts the ServerApp with ``FEDSPARSE_DEPLOYMENT``
naming the deployment folder (``programs.py``). A submitted run's config is the submitter's
word, so in a deployment: the folders it names (``out-dir``, ``resume-from``) must lie
under the folder's ``runs/`` (relative ones are taken from the deployment folder); it may
not choose where the ServerApp tracks (``tracking-uri``, ``artifact-location``: the
deployment's own MLflow server, from the ServerApp's environment) nor where devices keep
their state (``client-state-dir``: each node's own ``state-dir``); and which node serves
which partition comes from the registry of registered (authenticated) nodes, not from
what nodes declare.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedsparse.deploy.manifest import Manifest, load_registry
from fedsparse.deploy.programs import DEPLOYMENT_ENV
from fedsparse.scenario import ScenarioError

PATH_KEYS = ("out-dir", "resume-from")
REFUSED_KEYS = ("tracking-uri", "artifact-location", "client-state-dir")


def deployment_dir() -> Path | None:
    """The deployment folder this ServerApp serves, if it runs in a fedsparse deployment."""
    value = os.environ.get(DEPLOYMENT_ENV, "")
    return Path(value).resolve() if value else None


def confine(setting: dict[str, str], directory: Path) -> dict[str, str]:
    """``setting`` with its folders resolved inside ``directory/runs``; ScenarioError for a
    folder outside it or a key a submitter may not set in a deployment."""
    runs = (directory / "runs").resolve()
    problems = [f"{key} = {setting[key]!r}: set by the deployment, not by a submitted run"
                for key in REFUSED_KEYS if setting.get(key)]
    confined = dict(setting)
    for key in PATH_KEYS:
        if not setting.get(key):
            continue
        path = (directory / setting[key]).resolve()  # an absolute one stays itself
        if not path.is_relative_to(runs) or path == runs:
            problems.append(f"{key} = {setting[key]!r} is outside this deployment's run "
                            f"folders {runs}/")
        confined[key] = str(path)
    if not confined.get("out-dir"):
        problems.append(f"out-dir is empty: a deployed run needs a folder under {runs}/")
    if problems:
        raise ScenarioError("run config (deployment " + str(directory) + ")", problems)
    return confined


def registered_partitions(directory: Path) -> dict[int, int] | None:
    """Flower node id -> partition of every registered node; None in an insecure deployment
    (no node authentication, so nothing to register: nodes say which partition they serve).
    A secure deployment whose registry is missing or empty serves no partition at all."""
    if Manifest.load(directory).insecure:
        return None
    return {node_id: node.partition_id for node_id, node in load_registry(directory).items()}
