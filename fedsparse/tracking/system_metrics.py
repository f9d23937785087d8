"""MLflow's system metrics of a run (CPU, memory, disk, network, GPU where there is one),
sampled into the run folder and pushed by the mirror like the rounds.

MLflow's own ``log_system_metrics`` pushes each sample from a thread of its own, and stops
for good the first time the tracking server does not answer; here MLflow's monitors
(``mlflow.system_metrics``) take the samples, every ``interval_s`` seconds, and each goes to
``system_metrics.jsonl`` in the run folder first, so a server that is away misses nothing:
the mirror (``tracking/mirror.py``) pushes the samples it has not pushed yet, as
``system/<name>`` with ``step`` = the sample's number, whenever it pushes, and ``fedsparse
sync`` those the run could not. The sampler measures the machine of the ServerApp: in
simulation, the one the clients run on too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE = "system_metrics.jsonl"
PREFIX = "system/"
log = logging.getLogger("fedsparse.tracking")


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    """The samples in ``run_dir`` (``{"step", "time_ms", "metrics"}``), a torn last line
    (the process killed while it wrote) left out."""
    path = run_dir / FILE
    if not path.is_file():
        return []
    samples = []
    for line in path.read_text().splitlines():
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return samples


def monitors() -> list[Any]:
    """MLflow's system monitors, as ``log_system_metrics`` picks them: CPU and memory, disk,
    network, and an NVIDIA (else AMD) GPU's where its library finds one. (MLflow's own
    ``SystemMetricsMonitor`` is not used: it also opens a tracking store, the default one.)"""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    found: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            found.append(gpu())
            break
        except Exception:  # no such GPU, or no library for it
            continue
    return found


def _drop_torn_tail(run_dir: Path) -> int:
    """Cut a torn last line (a process killed while it appended) off the samples file, so
    that new samples start on a line of their own; the number of samples kept."""
    path = run_dir / FILE
    samples = read_samples(run_dir)
    if path.is_file():
        text = path.read_text()
        kept = "".join(json.dumps(s) + "\n" for s in samples)
        if text != kept:
            path.write_text(kept)
    return len(samples)


class SystemSampler:
    """Appends a sample of MLflow's system monitors to ``run_dir/system_metrics.jsonl``
    every ``interval_s`` seconds (none when it is 0), and calls ``on_sample`` after each,
    from a thread."""

    def __init__(self, run_dir: Path, interval_s: float,
                 on_sample: Callable[[], None] | None = None) -> None:
        self.run_dir, self.interval_s, self.on_sample = run_dir, interval_s, on_sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> SystemSampler:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Take a last sample and stop."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        parts = monitors()
        step = _drop_torn_tail(self.run_dir)  # a resumed run goes on counting
        while True:
            stopping = self._stop.wait(self.interval_s)
            metrics: dict[str, float] = {}
            for part in parts:
                part.collect_metrics()
                metrics |= {k: float(v) for k, v in part.aggregate_metrics().items()}
                part.clear_metrics()
            sample = {"step": step, "time_ms": int(time.time() * 1000), "metrics": metrics}
            with open(self.run_dir / FILE, "a") as fh:
                fh.write(json.dumps(sample) + "\n")
            step += 1
            if self.on_sample is not None:
                self.on_sample()
            if stopping:
                return
