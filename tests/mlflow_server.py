"""A real `mlflow server` (its REST API and UI) on 127.0.0.1, for the tests that need one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedsparse.launch import free_port
from fedsparse.tracking.mirror import unreachable


class MlflowServer:
    """`mlflow server` on a fixed loopback port over one store (``root/server.db`` unless
    given), started and stopped at will."""

    def __init__(self, root: Path, store: Path | None = None) -> None:
        self.root, self.port = root, free_port()
        self.store = store or root / "server.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.store}",
                 "--default-artifact-root", str(self.root / "artifacts")],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while unreachable(self.uri, timeout=1):
            assert time.monotonic() < deadline and self.proc.poll() is None, "no mlflow server"
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
