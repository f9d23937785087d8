"""A Ray of this host that runs join (``fedsparse compare``) is started, not waited for: the
watch on it (fedsparse/launch.py) must still stop a run whose Ray never comes, saying why,
since a simulation's ``ray.init`` would wait minutes for its GCS. Without Ray: a stand-in
``ray start`` that prints its banner, or exits, under a real supervisor."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

from fedsparse.launch import LocalRay, _RayWatch, supervised_with_handover

STARTED = "Ray runtime started."


def stand_in(tmp_path: Path, script: str):
    """A supervised ``python -c script`` as the LocalRay's ``ray start``."""
    return supervised_with_handover([sys.executable, "-c", script], tmp_path / "ray.log",
                                    env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_ray_that_exits_before_it_started_stops_the_run_and_says_why(tmp_path: Path):
    with stand_in(tmp_path, "import sys, time; time.sleep(0.3); sys.exit(3)") as handover:
        ray = LocalRay("127.0.0.1:1", handover)
        run = sleeper()
        watch = _RayWatch(ray, run)
        assert run.wait(timeout=30) != 0  # terminated by the watch
        watch.close()
        assert watch.failure == "ray start exited with code 3"
        assert watch.log_path == tmp_path / "ray.log"


def test_a_ray_that_started_leaves_the_run_alone(tmp_path: Path):
    banner = f"print({STARTED!r}, flush=True); import time; time.sleep(60)"
    with stand_in(tmp_path, banner) as handover:
        ray = LocalRay("127.0.0.1:1", handover)
        assert ray.wait_started(timeout=30) == ""
        run = sleeper()
        watch = _RayWatch(ray, run)
        time.sleep(0.5)
        watch.close()
        assert watch.failure == "" and run.poll() is None
        run.kill()
        run.wait()


def test_a_ray_still_starting_when_the_run_ends_is_not_waited_for(tmp_path: Path):
    with stand_in(tmp_path, "import time; time.sleep(60)") as handover:
        ray = LocalRay("127.0.0.1:1", handover)
        run = sleeper()
        watch = _RayWatch(ray, run)
        began = time.monotonic()
        watch.close()  # the run ended (its done event): the watch stops at once
        assert time.monotonic() - began < 5
        assert watch.failure == "" and psutil.pid_exists(run.pid) and run.poll() is None
        assert ray.wait_started(timeout=0.3) == "ray start did not start a Ray within 0 s"
        run.kill()
        run.wait()
