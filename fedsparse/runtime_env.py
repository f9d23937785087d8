"""The environment fedsparse runs Flower, Ray and MLflow under.

Nothing phones home (see ../shared/FLOWER.md section 0): Flower's telemetry, update check
and per-run dependency installation are off, MLflow and Hugging Face stay offline. The Ray
a simulation starts for itself binds to 127.0.0.1 and keeps its temp files under the working
directory; a simulation on an existing Ray cluster (``run.ray_address``) gets neither, since
the cluster's nodes chose their addresses and temp dirs when they were started.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

SPLITS_ENV = "FEDSPARSE_SPLITS_DIR"  # the clients' splits of the run (data/split_store.py)

NO_PHONE_HOME: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

# A Ray of the run's own: a single node on 127.0.0.1 (Ray's default is the routable address,
# with its ports open to the network). Never set where a cluster is joined: it also makes
# `ray start --address` refuse to add a node.
LOCAL_RAY: dict[str, str] = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Ray's GCS keeps a record of every task (each client call is one) up to
# task_events_max_num_task_in_gcs (100,000): about 0.4 MiB more every round of 100 clients,
# for the dashboard's task view, which a run of its own does not start. Its workers report
# none (0 turns the reporting off: src/ray/common/ray_config_def.h); a user's setting wins.
UNTRACED_RAY: dict[str, str] = {"RAY_task_events_report_interval_ms": "0"}

# When its first driver connects, Ray starts as many idle workers as it has CPUs
# (prestart_worker_first_driver), but Flower's actors carry a runtime_env (its PYTHONPATH),
# so Ray starts workers of their own for them and the idle ones only took CPU (0.5 s each)
# from the actors starting beside them. A user's setting wins.
NO_IDLE_WORKERS: dict[str, str] = {"RAY_prestart_worker_first_driver": "0"}

QUIET: dict[str, str] = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

# A SuperExec asks its SuperLink for a task to launch once a second by default
# (flwr/supercore/superexec/run_superexec.py): up to 1 s between `flwr run` and the start of
# flwr-simulation (or, on a local SuperNode, of each ClientApp). Five times a second here,
# for the processes of this host; a user's own setting wins.
PROMPT: dict[str, str] = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}

# Ray places unix sockets at <tmp>/ray/session_<date>_<micros>_<pid>/sockets/plasma_store
# (about 70 characters below <tmp>); AF_UNIX paths must fit in 107 bytes.
_MAX_RAY_TMPDIR = 36


def apply_no_phone_home() -> None:
    """Force the no-phone-home settings into this process's environment (and default the
    quiet ones, which a user may override)."""
    os.environ.update(NO_PHONE_HOME)
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


def state_dir(workdir: Path) -> Path:
    """Where fedsparse keeps Flower's home and Ray's temp files for runs started in ``workdir``."""
    return workdir.resolve() / ".fedsparse"


def splits_dir(workdir: Path) -> Path:
    """Where the clients' splits of runs started in ``workdir`` are kept for their processes
    (``fedsparse/data/split_store.py``)."""
    return state_dir(workdir) / "splits"


def ray_tmpdir(workdir: Path) -> Path:
    """Ray's temp dir under ``workdir``; a short alias under /tmp when the path is too long.

    Ray's socket paths (``<tmp>/ray/session_<date>_<pid>/sockets/plasma_store``) must fit
    in 107 bytes, so a deep working directory gets a symlink ``/tmp/fedsparse-ray-<hash>``
    that points into it: the files still live under the working directory.
    """
    target = state_dir(workdir) / "ray"
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= _MAX_RAY_TMPDIR:
        return target
    alias = Path("/tmp") / f"fedsparse-ray-{hashlib.sha1(str(target).encode()).hexdigest()[:10]}"
    if not alias.is_symlink() or alias.resolve() != target:
        alias.unlink(missing_ok=True)
        alias.symlink_to(target)
    return alias


def process_env(workdir: Path, ray_cluster: str = "") -> dict[str, str]:
    """Environment for the Flower processes (SuperLink, SuperNodes, `flwr run`) of one run;
    its simulation joins the Ray cluster at ``ray_cluster`` (``RAY_ADDRESS``, which
    ``ray.init`` reads), or starts a Ray of its own on 127.0.0.1 ("")."""
    env = {**PROMPT, **os.environ}
    env.update(NO_PHONE_HOME)
    env.update(QUIET)
    env["FLWR_HOME"] = str(state_dir(workdir) / "flwr_home")
    env[SPLITS_ENV] = str(splits_dir(workdir))
    if ray_cluster:
        env["RAY_ADDRESS"] = ray_cluster
    else:
        env.update(LOCAL_RAY)
        env = {**UNTRACED_RAY, **NO_IDLE_WORKERS, **env}
        env["RAY_TMPDIR"] = str(ray_tmpdir(workdir))
    # Flower's executables (flower-superlink, flwr, flwr-simulation, ...) live beside this
    # interpreter; a virtualenv that is not activated is not on PATH, and the SuperLink in turn
    # starts its children by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
