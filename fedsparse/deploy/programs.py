"""The one place that says which program each service of a deployment runs, with which flags.

``fedsparse deploy up`` starts these as daemons; ``docker-compose.yml`` runs each of them in
the foreground through ``fedsparse deploy service NAME DIR`` (one container per service), so
both start the same programs with the same flags.

Services of the SuperLink host: ``postgres`` (when the manifest's MLflow backend is a
PostgreSQL that the deployment manages), ``mlflow`` (tracking server, basic auth),
``superlink`` (Fleet, Control and Runtime APIs on 127.0.0.1 only) and ``fleet-proxy`` (the
only thing devices reach: the Fleet API's paths over TLS on the public address). A device
runs ``node:<name>`` (``flower-supernode``, its Runtime API on its own loopback).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedsparse.deploy.manifest import Manifest, Node
from fedsparse.protocol import NUM_PARTITIONS, PARTITION_ID

CA, SERVER_CERT, SERVER_KEY = "ca/ca.crt", "superlink/server.crt", "superlink/server.key"
DEPLOYMENT_ENV = "FEDSPARSE_DEPLOYMENT"  # the ServerApp's deployment folder (set on SuperLink)
SERVER_SERVICES = ("postgres", "mlflow", "superlink", "fleet-proxy")


@dataclass
class Program:
    """One long-lived service: its command, extra environment and readiness probe."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str = ""  # polled until 2xx after start ("" = the process staying up is enough)
    user: str = ""  # run as this (unprivileged) user, e.g. PostgreSQL's server under root
    cwd: str = ""


def node_service(node: Node) -> str:
    return f"node:{node.name}"


def superlink(directory: Path, manifest: Manifest) -> Program:
    """``flower-superlink`` on the host's loopback: TLS and node authentication unless the
    deployment is insecure, registrations and runs kept in ``state/superlink/state.db``."""
    argv = ["flower-superlink", "--host", "127.0.0.1", "--port", str(manifest.control_port),
            "--isolation", "subprocess", "--database",
            str(directory / "state/superlink/state.db"),
            "--disable-runtime-dependency-installation"]
    argv += ["--insecure"] if manifest.insecure else [
        "--ssl-ca-certfile", str(directory / CA), "--ssl-certfile", str(directory / SERVER_CERT),
        "--ssl-keyfile", str(directory / SERVER_KEY), "--enable-supernode-auth"]
    return Program("superlink", argv, env={DEPLOYMENT_ENV: str(directory),
                                           "FLWR_HOME": str(directory / "state/superlink")},
                   health_url=f"{scheme(manifest)}://127.0.0.1:{manifest.control_port}/health")


def fleet_proxy(directory: Path, manifest: Manifest) -> Program:
    """The Fleet API's paths (and ``/health``) on ``bind:port``, forwarded to the SuperLink."""
    argv = ["fedsparse-fleet-proxy", "--listen", f"{manifest.bind}:{manifest.port}",
            "--upstream", f"{scheme(manifest)}://127.0.0.1:{manifest.control_port}"]
    if not manifest.insecure:
        argv += ["--certfile", str(directory / SERVER_CERT),
                 "--keyfile", str(directory / SERVER_KEY), "--ca", str(directory / CA)]
    return Program("fleet-proxy", argv,
                   health_url=f"{scheme(manifest)}://127.0.0.1:{manifest.port}/health")


def supernode(directory: Path, manifest: Manifest, node: Node) -> Program:
    """``flower-supernode`` for ``node``: the node's key, the deployment's CA, its partition."""
    argv = ["flower-supernode", "--superlink", manifest.fleet_address,
            "--host", "127.0.0.1", "--port", str(node.runtime_port),
            "--isolation", "subprocess", "--node-config",
            f"{PARTITION_ID}={node.partition_id} {NUM_PARTITIONS}={manifest.num_partitions} "
            f"state-dir=\"{directory / 'state/nodes' / node.name / 'client-state'}\""]
    argv += ["--insecure"] if manifest.insecure else [
        "--root-certificates", str(directory / CA),
        "--auth-supernode-private-key", str(directory / node.key)]
    return Program(node_service(node), argv,
                   env={"FLWR_HOME": str(directory / "state/nodes" / node.name)})


def server_programs(directory: Path, manifest: Manifest) -> list[Program]:
    """The SuperLink host's services in start order."""
    from fedsparse.deploy import mlflow_service

    programs = []
    if manifest.manages_postgres:
        programs.append(mlflow_service.postgres(directory, manifest))
    programs.append(mlflow_service.mlflow(directory, manifest))
    link = superlink(directory, manifest)
    link.env |= mlflow_service.tracking_env(directory, manifest)
    return [*programs, link, fleet_proxy(directory, manifest)]


def program(directory: Path, manifest: Manifest, name: str) -> Program:
    """The program of service ``name`` (a server service, or ``node:<name>``)."""
    if name.startswith("node:"):
        return supernode(directory, manifest, manifest.node(name.removeprefix("node:")))
    by_name = {p.name: p for p in server_programs(directory, manifest)}
    if name not in by_name:
        from fedsparse.deploy.manifest import DeploymentError

        raise DeploymentError(f"unknown service {name!r}; this deployment has "
                              f"{sorted(by_name) + [node_service(n) for n in manifest.nodes]}")
    return by_name[name]


def service_env() -> dict[str, str]:
    """The environment every service starts from: this one, nothing phoning home, quiet
    logs, and this interpreter's folder first on PATH (Flower starts its children by name)."""
    from fedsparse.runtime_env import NO_PHONE_HOME, QUIET

    env = {**os.environ, **QUIET, **NO_PHONE_HOME}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def flower_env(directory: Path) -> dict[str, str]:
    """What ``flwr`` commands run under to reach the Control API (its own Flower home)."""
    return {**service_env(), "FLWR_HOME": str(directory / "state/flwr-cli")}


def scheme(manifest: Manifest) -> str:
    """``https``, or ``http`` in an insecure deployment (the SuperLink's and MLflow's)."""
    return "http" if manifest.insecure else "https"
