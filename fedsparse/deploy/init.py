"""``fedsparse deploy init`` and ``add-node``/``remove-node``: the files a deployment needs.

``init_deployment`` makes the CA, the SuperLink's certificate, one key pair per SuperNode
(``pki.py``), MLflow's and PostgreSQL's credentials (``secrets/mlflow.toml``, 0600) and,
last, the manifest; the layout is in ``manifest.py``. Nothing that exists is overwritten
without ``force``, and a refused init changes no file.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from pathlib import Path
from typing import cast, get_args

import tomli_w

from fedsparse.deploy import pki
from fedsparse.deploy.manifest import (
    CONTROL_PORT,
    FLEET_PORT,
    MANIFEST,
    MLFLOW_PORT,
    REGISTRY,
    Backend,
    DeploymentError,
    Manifest,
    Node,
)
from fedsparse.deploy.programs import CA, SERVER_CERT, SERVER_KEY

CA_KEY, SECRETS = "ca/ca.key", "secrets/mlflow.toml"
POSTGRES_PASSWORD = "secrets/postgres_password"
POSTGRES_ROLE = "mlflow"  # the role and database of MLflow's backend store
MLFLOW_USER = "fedsparse"
RUNTIME_PORT = 9100  # node-i's own Runtime API port: 9100 + i (unique, so nodes may share a host)
_NODE_NAME = re.compile(r"^node-(\d+)$")


def init_deployment(directory: Path, hosts: list[str], nodes: int, *, port: int = FLEET_PORT,
                    insecure: bool = False, mlflow_backend: str = "postgresql",
                    postgres_host: str = "", mlflow_host: str = "127.0.0.1",
                    mlflow_bind: str = "127.0.0.1", force: bool = False) -> Manifest:
    """Make a deployment in ``directory``: unless ``insecure``, a CA, the SuperLink's
    certificate for ``hosts`` and the keys of ``nodes`` SuperNodes (``node-0`` ... serving
    partitions 0 ...); always MLflow's credentials and the manifest, which is returned."""
    _check_init_args(hosts, nodes, port, mlflow_backend, postgres_host)
    pg_host, _, pg_port = postgres_host.rpartition(":") if ":" in postgres_host \
        else (postgres_host, "", "")
    manifest = Manifest(superlink_hosts=list(hosts),
                        nodes=[Node(f"node-{i}", i, RUNTIME_PORT + i) for i in range(nodes)],
                        port=port, insecure=insecure, postgres_host=pg_host,
                        mlflow_backend=cast(Backend, mlflow_backend), mlflow_host=mlflow_host,
                        mlflow_bind=mlflow_bind)
    if pg_host:  # an existing server: PostgreSQL's own default port unless given
        manifest.postgres_port = int(pg_port) if pg_port.isdigit() else 5432
    files = [MANIFEST]
    if not insecure:
        files += [CA, CA_KEY, SERVER_CERT, SERVER_KEY]
        files += [f for node in manifest.nodes for f in (node.key, node.public_key)]
    files += [SECRETS, POSTGRES_PASSWORD]
    if not force:
        pki.refuse_existing([directory / f for f in files])
    elif (directory / REGISTRY).exists() or (directory / "state").exists():
        raise DeploymentError(f"{directory} has been used (its registry.json or state/): new "
                              f"keys and passwords would not match the registrations, "
                              f"PostgreSQL and MLflow it holds; stop it (`fedsparse deploy "
                              f"down {directory}`) and delete registry.json and state/ first, "
                              f"or make the new deployment in another folder")
    if not insecure:
        ca_key, ca_cert = pki.make_ca(f"fedsparse deployment CA ({hosts[0]})")
        server_key, server_cert = pki.make_server_cert(  # MLflow serves the same certificate
            ca_key, ca_cert, [*hosts, *([mlflow_host] if mlflow_host not in hosts else [])])
        pki.write_private(directory / CA_KEY, pki.key_pem(ca_key), force)
        pki.write_public(directory / CA, pki.cert_pem(ca_cert), force)
        pki.write_private(directory / SERVER_KEY, pki.key_pem(server_key), force)
        pki.write_public(directory / SERVER_CERT, pki.cert_pem(server_cert), force)
        for node in manifest.nodes:
            _write_node_key(directory, node, force)
    secret = {"mlflow": {"username": MLFLOW_USER, "password": secrets.token_urlsafe(24),
                         "secret_key": secrets.token_urlsafe(32)},
              "postgres": {"username": POSTGRES_ROLE, "password": secrets.token_urlsafe(24)}}
    pki.write_private(directory / SECRETS, tomli_w.dumps(secret).encode(), force)
    # the same password alone in a file, for a PostgreSQL container (POSTGRES_PASSWORD_FILE)
    pki.write_private(directory / POSTGRES_PASSWORD, secret["postgres"]["password"].encode(),
                      force)
    manifest.save(directory)
    return manifest


def add_node(directory: Path) -> Node:
    """One more SuperNode: the next name ``node-K``, the lowest partition no node serves, the
    lowest free Runtime API port from 9100, its key pair (unless insecure); saved."""
    manifest = Manifest.load(directory)
    indices = [int(m[1]) for n in manifest.nodes if (m := _NODE_NAME.match(n.name))]
    partitions = {n.partition_id for n in manifest.nodes}
    ports = {n.runtime_port for n in manifest.nodes}
    node = Node(name=f"node-{max(indices, default=-1) + 1}",
                partition_id=min(set(range(len(manifest.nodes) + 1)) - partitions),
                runtime_port=min(set(range(RUNTIME_PORT, RUNTIME_PORT + len(ports) + 1)) - ports))
    if not manifest.insecure:
        _write_node_key(directory, node, force=False)
    manifest.nodes.append(node)
    manifest.save(directory)
    return node


def remove_node_files(directory: Path, name: str) -> Node:
    """Drop node ``name`` from the manifest and delete its key pair (its folder too, if that
    leaves it empty); the removed node is returned. Unregistering it is the caller's job."""
    manifest = Manifest.load(directory)
    node = manifest.node(name)
    manifest.nodes.remove(node)
    manifest.save(directory)
    for relative in (node.key, node.public_key):
        (directory / relative).unlink(missing_ok=True)
    folder = (directory / node.key).parent
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return node


def read_secrets(directory: Path) -> dict[str, dict[str, str]]:
    """``secrets/mlflow.toml``: ``{"mlflow": {"username", "password", "secret_key"},
    "postgres": {"username", "password"}}``, or a :class:`DeploymentError` saying what lacks."""
    path = directory / SECRETS
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise DeploymentError(f"{path}: cannot read the deployment's credentials "
                              f"({err.strerror}); `fedsparse deploy init` makes them") from None
    except tomllib.TOMLDecodeError as err:
        raise DeploymentError(f"{path}: not valid TOML ({err})") from None
    wanted = {"mlflow": ("username", "password", "secret_key"),
              "postgres": ("username", "password")}
    missing = [f"{table}.{key}" for table, keys in wanted.items() for key in keys
               if not isinstance(data.get(table, {}).get(key), str)]
    if missing:
        raise DeploymentError(f"{path}: no {', '.join(missing)}; make new credentials with "
                              "`fedsparse deploy init --force`")
    return data


def _write_node_key(directory: Path, node: Node, force: bool) -> None:
    private, public = pki.make_node_key(comment=f"fedsparse {node.name}")
    pki.write_private(directory / node.key, private, force)
    pki.write_public(directory / node.public_key, public, force)


def _check_init_args(hosts: list[str], nodes: int, port: int, mlflow_backend: str,
                     postgres_host: str) -> None:
    if not hosts:
        raise DeploymentError("give at least one --superlink-host (the SuperLink's address "
                              "as the devices reach it: an IP address or a DNS name)")
    pki.subject_alt_names(hosts)  # every host is an IP address or a DNS name
    if nodes < 1:
        raise DeploymentError(f"--nodes {nodes}: a deployment needs at least 1 SuperNode")
    if not 1 <= port <= 65535:
        raise DeploymentError(f"--port {port}: a TCP port is 1..65535")
    if port in (CONTROL_PORT, MLFLOW_PORT):
        raise DeploymentError(f"--port {port} is taken on the SuperLink's host (by the "
                              f"SuperLink itself on {CONTROL_PORT}, MLflow on {MLFLOW_PORT}); "
                              "choose another")
    backends = get_args(Backend)
    if mlflow_backend not in backends:
        raise DeploymentError(f"--mlflow-backend {mlflow_backend!r}: choose one of "
                              f"{', '.join(backends)}")
    if postgres_host and mlflow_backend != "postgresql":
        raise DeploymentError("--postgres-host is only for --mlflow-backend postgresql")
