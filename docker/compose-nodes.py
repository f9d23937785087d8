#!/usr/bin/env python3
"""Print a compose override with N SuperNode services, ``supernode-0`` .. ``supernode-<N-1>``.

    docker/compose-nodes.py 4 > docker-compose.nodes.yml
    FEDSPARSE_NODES=4 docker-compose -f docker-compose.yml -f docker-compose.nodes.yml up -d

Each service is ``supernode-0`` of docker-compose.yml with its node's name: the same image,
volume, network, dependencies and restart policy, so the pattern lives in one place.
FEDSPARSE_NODES must be the same N: `init` makes that many node keys (node-0 .. node-<N-1>).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
TEMPLATE = "supernode-0"


def node_services(template: dict[str, Any], count: int) -> dict[str, Any]:
    """``count`` copies of the SuperNode service ``template``, each running its own node."""
    services = {}
    for index in range(count):
        service = copy.deepcopy(template)
        service["command"] = [f"node:node-{index}" if arg == "node:node-0" else arg
                              for arg in template["command"]]
        services[f"supernode-{index}"] = service
    return services


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, help="number of SuperNodes (at least 1)")
    parser.add_argument("--compose", type=Path, default=COMPOSE,
                        help="the compose file whose supernode-0 is the template")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("count must be at least 1")
    template = yaml.safe_load(args.compose.read_text())["services"][TEMPLATE]
    sys.stdout.write(f"# docker/compose-nodes.py {args.count}: use with "
                     f"FEDSPARSE_NODES={args.count} (init makes that many node keys)\n")
    yaml.safe_dump({"services": node_services(template, args.count)}, sys.stdout,
                   sort_keys=False, default_flow_style=None, width=100)


if __name__ == "__main__":
    main()
