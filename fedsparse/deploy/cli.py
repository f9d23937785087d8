"""``fedsparse deploy``: set up, start, inspect and stop a federation outside simulation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedsparse.deploy.manifest import FLEET_PORT, Manifest

INSECURE_WARNING = ("fedsparse: WARNING: an INSECURE deployment: no TLS (everything, model "
                    "updates included, crosses the network in plain text) and no node "
                    "authentication (any machine that reaches the SuperLink can join, claim "
                    "any partition, or unregister other nodes). For a trial on a trusted "
                    "network only.")

EPILOG = """\
On the SuperLink host:
  fedsparse deploy init DIR --superlink-host 192.0.2.10 --nodes 3
  fedsparse deploy up DIR --server      # PostgreSQL, MLflow, SuperLink, Fleet proxy
  fedsparse run scenarios/quickstart.toml --deployment DIR
On each device (with DIR/ca/ca.crt, DIR/deployment.toml and DIR/nodes/<name>/ copied over):
  fedsparse deploy up DIR --node node-0
Everything on one machine (a trial): `fedsparse deploy up DIR`. Stop with `deploy down DIR`.
"""


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The ``deploy`` command group of the ``fedsparse`` CLI."""
    deploy = commands.add_parser(
        "deploy", help="set up and run a federation on real devices (TLS, node auth, MLflow)",
        description="A Flower Deployment Engine federation owned by one folder: "
                    "certificates and keys, long-lived services (they outlive this command; "
                    "only `deploy down` stops them), node registration.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = deploy.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("init", help="make a deployment folder: CA, certificates, node keys",
                         description="Make a CA, the SuperLink's certificate (its SANs: every "
                                     "--superlink-host, localhost and 127.0.0.1), one ECDSA "
                                     "key pair per SuperNode (OpenSSH format), MLflow's "
                                     "credentials and the manifest deployment.toml.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--superlink-host", action="append", required=True, metavar="HOST",
                   help="a name or IP address devices use to reach the SuperLink "
                        "(repeatable; the first is the one nodes connect to)")
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="number of SuperNodes")
    p.add_argument("--port", type=int, default=FLEET_PORT,
                   help=f"the port devices connect to (default {FLEET_PORT}, Flower's)")
    p.add_argument("--mlflow-backend", choices=("postgresql", "sqlite"), default="postgresql",
                   help="MLflow's backend store (default postgresql; sqlite: a file, lighter)")
    p.add_argument("--postgres-host", default="", metavar="HOST[:PORT]",
                   help="an existing PostgreSQL server (default: one `deploy up` starts)")
    p.add_argument("--mlflow-host", default="127.0.0.1", metavar="HOST",
                   help="the name the ServerApp reaches MLflow by (default 127.0.0.1: it runs "
                        "on the SuperLink host; in compose: the mlflow service)")
    p.add_argument("--mlflow-bind", default="127.0.0.1", metavar="ADDRESS",
                   help="where the MLflow server listens (default 127.0.0.1: reach its UI "
                        "through an SSH tunnel; 0.0.0.0 in a container)")
    p.add_argument("--insecure", action="store_true",
                   help="INSECURE: no TLS and no node authentication (a quick trial only)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.add_argument("--exist-ok", action="store_true",
                   help="do nothing (exit 0) if DIR already holds a deployment")

    p = verbs.add_parser("up", help="start the deployment's services (they outlive this "
                                    "command)")
    p.add_argument("dir", type=Path, metavar="DIR")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--server", action="store_true",
                       help="only the SuperLink host's services (no SuperNodes)")
    which.add_argument("--node", action="append", default=[], metavar="NAME",
                       help="only this SuperNode (repeatable), e.g. on a device")

    p = verbs.add_parser("status", help="show the services and the nodes' registrations")
    p.add_argument("dir", type=Path, metavar="DIR")

    p = verbs.add_parser("down", help="stop the deployment's services")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--service", action="append", default=[], metavar="NAME",
                   help="only this service (e.g. superlink, node:node-1; repeatable)")

    p = verbs.add_parser("add-node", help="make one more node's key and register it")
    p.add_argument("dir", type=Path, metavar="DIR")

    p = verbs.add_parser("remove-node", help="stop and unregister one node (for good)")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("node", metavar="ID", help="the node's name (node-2) or Flower node id")

    p = verbs.add_parser("register", help="register every node key not yet registered "
                                          "(what `up` does; a one-shot for compose)")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="seconds to wait for the SuperLink (default 120)")

    p = verbs.add_parser("service", help="run one service in the foreground (containers)")
    p.add_argument("name", metavar="NAME",
                   help="postgres, mlflow, superlink, fleet-proxy or node:<name>")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--print", action="store_true", help="print the command instead")


def main(args: argparse.Namespace) -> int:
    """Run one ``deploy`` verb (a DeploymentError says what the user must fix)."""
    args.dir = args.dir.resolve()  # services run elsewhere than here: absolute paths only
    return {"init": _init, "up": _up, "status": _status, "down": _down,
            "add-node": _add_node, "remove-node": _remove_node, "register": _register,
            "service": _service}[args.verb](args)


def _init(args: argparse.Namespace) -> int:
    from fedsparse.deploy.init import init_deployment
    from fedsparse.deploy.manifest import MANIFEST

    if args.exist_ok and (args.dir / MANIFEST).is_file():
        print(f"fedsparse: {args.dir} already holds a deployment; left as it is")
        return 0
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    manifest = init_deployment(args.dir, args.superlink_host, args.nodes, port=args.port,
                               insecure=args.insecure, mlflow_backend=args.mlflow_backend,
                               postgres_host=args.postgres_host,
                               mlflow_host=args.mlflow_host, mlflow_bind=args.mlflow_bind,
                               force=args.force)
    print(f"fedsparse: deployment in {args.dir}: SuperLink {manifest.fleet_address} for "
          f"devices, runs submitted at {manifest.control_address} on the SuperLink host, "
          f"{len(manifest.nodes)} node keys under {args.dir / 'nodes'}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from fedsparse.deploy import daemons, operations

    manifest = operations.checked_manifest(args.dir, server=not args.node)
    if manifest.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    with daemons.locked(args.dir):
        started = []
        if not args.node:
            started += operations.up_server(args.dir, manifest)
        if not args.server:
            started += operations.up_nodes(args.dir, manifest, args.node)
    for daemon in started:
        print(f"  {daemon.name:<16} pid {daemon.pid:<8} log {daemon.log}")
    print(f"fedsparse: up; stop with `fedsparse deploy down {args.dir}`")
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedsparse.deploy import operations

    manifest = Manifest.load(args.dir)
    transport = ("INSECURE: no TLS, no node authentication" if manifest.insecure
                 else "TLS, node authentication")
    print(f"{args.dir}: {transport}; devices connect to {manifest.fleet_address}, runs are "
          f"submitted at {manifest.control_address} on the SuperLink host")
    rows = operations.status(args.dir)
    for row in rows:
        pid = str(row.pid) if row.pid else "-"
        print(f"{row.name:<16} {row.state:<12} pid {pid:<8} {row.detail}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from fedsparse.deploy import daemons, operations

    Manifest.load(args.dir)
    with daemons.locked(args.dir):
        stopped = operations.down(args.dir, args.service)
    print(f"fedsparse: stopped {', '.join(stopped) if stopped else 'nothing (none running)'}")
    return 0


def _add_node(args: argparse.Namespace) -> int:
    from fedsparse.deploy import daemons, operations

    with daemons.locked(args.dir):
        node, node_id = operations.add_node(args.dir)
    registered = (f"registered as node {node_id}" if node_id is not None
                  else "registered at the next `deploy up` (the SuperLink is not running)")
    print(f"fedsparse: {node.name} serves partition {node.partition_id}, key "
          f"{args.dir / node.key}, {registered}; start it with "
          f"`fedsparse deploy up {args.dir} --node {node.name}` (running nodes restart with "
          f"the new number of partitions at the next `deploy up`)")
    return 0


def _remove_node(args: argparse.Namespace) -> int:
    from fedsparse.deploy import daemons, operations

    with daemons.locked(args.dir):
        node = operations.remove_node(args.dir, args.node)
    print(f"fedsparse: {node.name} stopped, unregistered and removed")
    return 0


def _register(args: argparse.Namespace) -> int:
    from fedsparse.deploy import daemons, operations

    manifest = operations.checked_manifest(args.dir, server=True)
    operations.wait_superlink(args.dir, manifest, args.wait)
    with daemons.locked(args.dir):
        registry = operations.register_all(args.dir, manifest)
    print(f"fedsparse: {len(registry)} nodes registered")
    return 0


def _service(args: argparse.Namespace) -> int:
    from fedsparse.deploy import daemons, operations
    from fedsparse.deploy.programs import program, service_env

    manifest = Manifest.load(args.dir)
    prog = program(args.dir, manifest, args.name)
    if args.print:
        print(" ".join(prog.argv))
        return 0
    operations.prepare(args.dir, manifest, prog)
    argv = daemons.supervised_argv(prog)
    os.chdir(prog.cwd or args.dir)
    os.execvpe(argv[0], argv, {**service_env(), **prog.env})
