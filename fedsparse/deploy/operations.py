"""What ``fedsparse deploy up/down/status/register/add-node/remove-node`` do.

``up`` on the SuperLink host starts, in order: PostgreSQL (when the deployment manages it),
the MLflow server, the SuperLink (loopback only), registers every node key not yet
registered, then the Fleet proxy, so that no node can connect before its key is
registered; then the SuperNodes that run on this machine. A service that already runs is
left alone, unless its command changed (a node after ``add-node`` changed the number of
partitions): then it is restarted. ``down`` stops them in the reverse order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from fedsparse.deploy import daemons, flower_cli
from fedsparse.deploy.manifest import (
    DeploymentError,
    Manifest,
    Node,
    load_registry,
    save_registry,
)
from fedsparse.deploy.programs import (
    SERVER_SERVICES,
    Program,
    program,
    server_programs,
    service_env,
    supernode,
)

POSTGRES_READY_S = 60.0
SUPERLINK_READY_S = 120.0


def checked_manifest(directory: Path, server: bool) -> Manifest:
    """The manifest, with what the services to start need checked (clear errors, before any
    start): the SuperLink's certificate and key for the ``server`` services, the CA alone
    on a device (which holds only the manifest, the CA and its own node folder)."""
    from fedsparse.deploy import pki
    from fedsparse.deploy.programs import CA, SERVER_CERT, SERVER_KEY

    manifest = Manifest.load(directory)
    if manifest.insecure:
        return manifest
    if server:
        pki.check_server_cert(directory / SERVER_CERT, directory / CA, directory / SERVER_KEY,
                              [*manifest.superlink_hosts, manifest.mlflow_host])
    else:
        pki.check_ca(directory / CA)
    return manifest


def _start(directory: Path, manifest: Manifest, prog: Program) -> daemons.Daemon:
    running = daemons.find(directory, prog.name)
    if running is not None and running.process() is not None:
        if running.argv == prog.argv:
            return running
        daemons.stop(directory, prog.name)  # its command changed: restart it
    prepare(directory, manifest, prog)
    return daemons.start(directory, prog, service_env())


def up_server(directory: Path, manifest: Manifest) -> list[daemons.Daemon]:
    """The SuperLink host's services, started in order, nodes registered before the proxy."""
    from fedsparse.deploy import mlflow_service

    started = []
    for prog in server_programs(directory, manifest):
        if prog.name == "fleet-proxy":
            register_all(directory, manifest)
        started.append(_start(directory, manifest, prog))
        if prog.name == "postgres":
            _wait(lambda: mlflow_service.postgres_ready(directory, manifest), POSTGRES_READY_S,
                  "PostgreSQL", daemons.log_path(directory, prog.name))
            mlflow_service.ensure_database(directory, manifest)
    return started


def prepare(directory: Path, manifest: Manifest, prog: Program) -> None:
    """What a service needs made before it starts (as a daemon or in a container): the
    folders Flower expects, PostgreSQL's cluster, MLflow's auth configuration."""
    from fedsparse.deploy import mlflow_service

    daemons.make_folders(directory, prog)
    if prog.name == "postgres":
        mlflow_service.postgres_setup(directory, manifest)
    if prog.name == "mlflow":
        mlflow_service.mlflow_setup(directory, manifest)


def up_nodes(directory: Path, manifest: Manifest, names: list[str]) -> list[daemons.Daemon]:
    """The SuperNodes ``names`` (every node of the manifest if empty) on this machine."""
    from fedsparse.deploy import pki

    nodes = [manifest.node(n) for n in names] if names else manifest.nodes
    if not manifest.insecure:
        for node in nodes:
            pki.check_node_key(directory / node.key)
    return [_start(directory, manifest, supernode(directory, manifest, node))
            for node in nodes]


def _wait(ready: Callable[[], bool], seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise DeploymentError(f"{what} was not ready within {seconds:.0f}s; see {log}")
        time.sleep(0.25)


def wait_superlink(directory: Path, manifest: Manifest, seconds: float) -> None:
    """Until the SuperLink answers its health check on the Control address."""
    url = program(directory, manifest, "superlink").health_url
    _wait(lambda: not daemons.health_problem(directory, url), seconds,
          f"the SuperLink at {manifest.control_address}",
          daemons.log_path(directory, "superlink"))


def register_all(directory: Path, manifest: Manifest) -> dict[int, Node]:
    """Register every node of the manifest whose key is not registered yet; the registry.

    An insecure deployment has no node authentication, so nothing to register: its nodes
    are identified by what they declare (see the README's risks)."""
    registry = load_registry(directory)
    if manifest.insecure:
        return registry
    known = {node.name for node in registry.values()}
    for node in manifest.nodes:
        if node.name not in known:
            registry[flower_cli.register(directory, manifest, node)] = node
            save_registry(directory, registry)
    return registry


def down(directory: Path, names: list[str]) -> list[str]:
    """Stop the services ``names`` (all if empty): the nodes, then the server's in the reverse
    of their start order (MLflow before its PostgreSQL); those that were running."""
    order = {name: i for i, name in enumerate(SERVER_SERVICES)}
    targets = sorted((d.name for d in daemons.recorded(directory)
                      if not names or d.name in names), key=lambda n: -order.get(n, len(order)))
    return [name for name in targets if daemons.stop(directory, name)]


@dataclass
class ServiceStatus:
    name: str
    state: str  # running | stopped | not started
    pid: int | None
    log: str
    detail: str = ""


def status(directory: Path) -> list[ServiceStatus]:
    """Every service of the deployment (server services and nodes), and how each node
    stands at the SuperLink (registered, online, offline) when the SuperLink answers."""
    manifest = Manifest.load(directory)
    names = [n for n in SERVER_SERVICES if n != "postgres" or manifest.manages_postgres]
    names += [f"node:{n.name}" for n in manifest.nodes]
    registry = load_registry(directory)
    at_link: dict[int, str] = {}
    superlink = daemons.find(directory, "superlink")
    if not manifest.insecure and superlink is not None and superlink.process() is not None:
        with suppress(DeploymentError):
            at_link = flower_cli.listed(directory, manifest)
    node_state = {f"node:{node.name}": f"node id {node_id}: {at_link.get(node_id, 'unknown')}"
                  for node_id, node in registry.items()}
    rows = []
    for name in names:
        daemon = daemons.find(directory, name)
        proc = daemon.process() if daemon else None
        state = "running" if proc else ("stopped" if daemon else "not started")
        rows.append(ServiceStatus(name, state, daemon.pid if proc else None,
                                  str(daemons.log_path(directory, name)),
                                  node_state.get(name, "")))
    return rows


def add_node(directory: Path) -> tuple[Node, int | None]:
    """One more node: its key, its registration (if the SuperLink runs here); its node id."""
    from fedsparse.deploy import init

    node = init.add_node(directory)
    manifest = Manifest.load(directory)
    superlink = daemons.find(directory, "superlink")
    if manifest.insecure or superlink is None or superlink.process() is None:
        return node, None
    registry = register_all(directory, manifest)
    return node, next(i for i, n in registry.items() if n.name == node.name)


def remove_node(directory: Path, ident: str) -> Node:
    """Stop, unregister (for good) and forget one node, by name or Flower node id."""
    from fedsparse.deploy import init

    manifest = Manifest.load(directory)
    registry = load_registry(directory)
    by_id = {str(i): n for i, n in registry.items()}
    node = by_id[ident] if ident in by_id else manifest.node(ident)
    daemons.stop(directory, f"node:{node.name}")
    node_ids = [i for i, n in registry.items() if n.name == node.name]
    if node_ids:
        superlink = daemons.find(directory, "superlink")
        if superlink is None or superlink.process() is None:
            raise DeploymentError(f"{node.name} is registered as node {node_ids[0]}: start the "
                                  f"SuperLink (`fedsparse deploy up {directory}`) so that it "
                                  f"can be unregistered, then remove it")
        flower_cli.unregister(directory, manifest, node_ids[0])
        del registry[node_ids[0]]
        save_registry(directory, registry)
    init.remove_node_files(directory, node.name)
    return node
