"""The deployment manifest: what ``fedsparse deploy init`` made and how the services meet.

``DIR/deployment.toml`` holds no secret; paths in it are relative to ``DIR``. The files it
names are laid out as::

    DIR/deployment.toml          this manifest
    DIR/ca/ca.crt, ca.key        the deployment's CA (ca.key: 0600, needed only to sign)
    DIR/superlink/server.crt     the SuperLink's certificate (SANs: the superlink hosts,
    DIR/superlink/server.key       localhost, 127.0.0.1), also served by MLflow
    DIR/nodes/<name>/node.key    a SuperNode's ECDSA key (OpenSSH, 0600) and node.key.pub
    DIR/secrets/mlflow.toml      MLflow's (and PostgreSQL's) username and password (0600)
    DIR/registry.json            Flower node id -> node name and partition (``deploy up``)
    DIR/state/                   pidfiles, logs, the SuperLink's database, PostgreSQL, MLflow
    DIR/runs/                    the run folders of the scenarios submitted to it
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedsparse.durable import write_bytes

MANIFEST, REGISTRY = "deployment.toml", "registry.json"
FLEET_PORT = 8000  # Flower's default SuperLink port: what devices connect to
CONTROL_PORT = 8010  # the SuperLink itself, on 127.0.0.1 only (submission, Runtime API)
MLFLOW_PORT = 5000
POSTGRES_PORT = 5440  # not 5432: there the Debian package starts a cluster of its own
Backend = Literal["postgresql", "sqlite"]


class DeploymentError(RuntimeError):
    """A deployment folder, or what is asked of it, is not valid; the message says why."""


@dataclass
class Node:
    """One SuperNode: its name, the partition it serves, its key (relative to DIR)."""

    name: str
    partition_id: int
    runtime_port: int = 9094  # the SuperNode's own Runtime API, on its host's loopback

    @property
    def key(self) -> str:
        return f"nodes/{self.name}/node.key"

    @property
    def public_key(self) -> str:
        return f"nodes/{self.name}/node.key.pub"


@dataclass
class Manifest:
    """A deployment: its SuperLink's names, ports, transport, MLflow backend and nodes."""

    superlink_hosts: list[str]
    nodes: list[Node]
    port: int = FLEET_PORT
    control_port: int = CONTROL_PORT
    bind: str = "0.0.0.0"  # where the Fleet proxy listens on the SuperLink host
    insecure: bool = False
    mlflow_backend: Backend = "postgresql"
    mlflow_port: int = MLFLOW_PORT
    mlflow_bind: str = "127.0.0.1"
    mlflow_host: str = "127.0.0.1"  # how the ServerApp reaches MLflow (compose: its service)
    postgres_host: str = ""  # "" = a PostgreSQL that ``deploy up`` starts in DIR/state
    postgres_port: int = POSTGRES_PORT  # the managed one's, or postgres_host's (often 5432)
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect (the first SuperLink host, the Fleet port)."""
        return f"{self.superlink_hosts[0]}:{self.port}"

    @property
    def control_address(self) -> str:
        """Where runs are submitted and keys registered: the SuperLink host's loopback."""
        return f"127.0.0.1:{self.control_port}"

    @property
    def manages_postgres(self) -> bool:
        """Whether ``deploy up`` runs MLflow's PostgreSQL (in ``DIR/state/postgres``)."""
        return self.mlflow_backend == "postgresql" and not self.postgres_host

    @property
    def num_partitions(self) -> int:
        """Partitions of the data the nodes serve: 0 .. the highest a node serves (a removed
        node leaves its partition unserved until ``add-node`` fills it)."""
        return max((n.partition_id for n in self.nodes), default=-1) + 1

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise DeploymentError(f"no node {name!r} in this deployment; its nodes are "
                              f"{[n.name for n in self.nodes]}")

    def save(self, directory: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "extra"} | self.extra
        write_bytes(directory / MANIFEST, tomli_w.dumps(data).encode())

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.is_file():
            raise DeploymentError(f"{directory} is not a deployment folder (no {MANIFEST}); "
                                  f"make one with `fedsparse deploy init {directory} ...`")
        try:
            data = tomllib.loads(path.read_text())
            nodes = [Node(**n) for n in data.pop("nodes", [])]
            known = set(cls.__dataclass_fields__) - {"nodes", "extra"}
            extra = {k: data.pop(k) for k in list(data) if k not in known}
            return cls(nodes=nodes, extra=extra, **data)
        except (tomllib.TOMLDecodeError, TypeError, AttributeError) as err:
            raise DeploymentError(f"{path} is damaged ({err}); `fedsparse deploy init` "
                                  f"writes it") from None


def load_registry(directory: Path) -> dict[int, Node]:
    """Flower node id -> the node (and partition) it was registered as; {} before ``up``."""
    path = directory / REGISTRY
    if not path.is_file():
        return {}
    return {int(node_id): Node(**node) for node_id, node in json.loads(path.read_text()).items()}


def save_registry(directory: Path, registry: dict[int, Node]) -> None:
    data = {str(node_id): asdict(node) for node_id, node in sorted(registry.items())}
    write_bytes(directory / REGISTRY, json.dumps(data, indent=2).encode())
