"""A container's health check: GET the health URL of deployment service NAME, the URL that
``fedsparse deploy up`` polls (``fedsparse.deploy.programs``), trusting the deployment's CA.

    python /opt/fedsparse/healthcheck.py superlink /deploy     (exit 0: healthy)

The URL (scheme, port) follows the manifest, so one compose file serves TLS and insecure
deployments alike. A service without a health URL is healthy while its process runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedsparse.deploy.daemons import health_problem
from fedsparse.deploy.manifest import DeploymentError, Manifest
from fedsparse.deploy.programs import program


def healthy(name: str, directory: Path) -> bool:
    try:
        url = program(directory, Manifest.load(directory), name).health_url
    except DeploymentError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return False
    problem = health_problem(directory, url, timeout=5.0) if url else ""
    if problem:
        print(f"{name}: {url}: {problem}", file=sys.stderr)
    return not problem


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} NAME DIR")
    sys.exit(0 if healthy(sys.argv[1], Path(sys.argv[2])) else 1)
