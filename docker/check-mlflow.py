#!/usr/bin/env python3
"""Check from the host that a deployment's MLflow server holds a finished run with metrics,
and that it refuses anonymous requests (docker/compose-e2e.sh; standard library only).

    docker/check-mlflow.py DIR     DIR holds the deployment's deployment.toml, mlflow.toml
                                   ([mlflow] username, password) and ca.crt, copied out

The server is reached where docker-compose.yml publishes it: 127.0.0.1:<mlflow_port>.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class Server:
    """MLflow's REST API at ``url``, with basic auth when ``login`` is given."""

    def __init__(self, url: str, context: ssl.SSLContext | None, login: tuple[str, str] | None):
        self.url, self.context = url, context
        self.auth = ("Basic " + base64.b64encode(":".join(login).encode()).decode()
                     if login else "")

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"} | (
                {"Authorization": self.auth} if self.auth else {}))
        with urllib.request.urlopen(request, timeout=30, context=self.context) as response:
            return json.loads(response.read() or b"{}")


def check(directory: Path) -> str:
    """What was found (one line); raises ``AssertionError`` saying what is missing."""
    manifest = tomllib.loads((directory / "deployment.toml").read_text())
    secrets = tomllib.loads((directory / "mlflow.toml").read_text())
    scheme = "http" if manifest.get("insecure") else "https"
    url = f"{scheme}://127.0.0.1:{manifest.get('mlflow_port', 5000)}"
    context = (ssl.create_default_context(cafile=str(directory / "ca.crt"))
               if scheme == "https" else None)
    try:
        Server(url, context, None).call("/api/2.0/mlflow/experiments/search?max_results=100")
        raise AssertionError(f"{url} answered an anonymous request")
    except urllib.error.HTTPError as error:
        assert error.code == 401, f"anonymous request: HTTP {error.code}, expected 401"
    login = secrets["mlflow"]
    server = Server(url, context, (login["username"], login["password"]))
    experiments = server.call("/api/2.0/mlflow/experiments/search?max_results=100")
    ids = [e["experiment_id"] for e in experiments.get("experiments", [])]
    assert ids, f"{url} has no experiment"
    runs = server.call("/api/2.0/mlflow/runs/search",
                       {"experiment_ids": ids, "max_results": 100}).get("runs", [])
    finished = [r for r in runs if r["info"]["status"] == "FINISHED"
                and r.get("data", {}).get("metrics")]
    assert finished, f"{url}: no finished run with metrics among {len(runs)} run(s)"
    run = finished[0]
    return (f"{url}: run {run['info']['run_name']} ({run['info']['run_id']}) FINISHED, "
            f"{len(run['data']['metrics'])} metrics; anonymous request refused (401)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR")
    try:
        print(check(Path(sys.argv[1])))
    except (AssertionError, OSError, KeyError) as error:
        sys.exit(f"MLflow check failed: {error!r}")
