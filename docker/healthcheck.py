"""A container's health check: GET the health URL of deployment service NAME, the URL that
``fedsparse deploy up`` polls (``fedsparse.deploy.programs``), trusting the deployment's CA.

    python /opt/fedsparse/healthcheck.py superlink /deploy     (exit 0: healthy)

The URL (scheme, port) follows the manifest, so one compose file serves TLS and insecure
deployments alike. A service without a health URL is healthy while its process runs.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request
from pathlib import Path

from fedsparse.deploy.manifest import DeploymentError, Manifest
from fedsparse.deploy.programs import CA, program


def healthy(name: str, directory: Path, timeout: float = 5.0) -> bool:
    try:
        url = program(directory, Manifest.load(directory), name).health_url
    except DeploymentError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return False
    if not url:
        return True
    context = (ssl.create_default_context(cafile=str(directory / CA))
               if url.startswith("https:") else None)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return 200 <= response.status < 300
    except OSError as error:  # refused, timed out, TLS failure, HTTP error status
        print(f"{name}: {url}: {error}", file=sys.stderr)
        return False


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} NAME DIR")
    sys.exit(0 if healthy(sys.argv[1], Path(sys.argv[2])) else 1)
