"""End-to-end time of the quickstart and of a three-arm ``compare``, and how much of it is
fixed cost, for one or more checkouts of fedsparse measured in turn.

Each checkout's CLI runs with ``PYTHONPATH`` set to that checkout, so every process of the
run (SuperLink, ``flwr run``, ``flwr-simulation``, Ray actors) runs its code; the arms
alternate (A, B, A, B, ...) so that they see the same machine, whose speed can move by a
quarter within an hour. Every checkout gets a work folder of its own: its first run there
also creates the MLflow schema and keeps the split, and is reported apart.

    python benchmarks/startup.py [--runs 4] [--compare] [--checkout DIR ...]

Fixed cost = wall time minus the ServerApp's rounds (``rounds_s`` of each run's summary).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
ARMS = ("a", "b", "c")  # compare: the quickstart under three names


def run_cli(checkout: Path, workdir: Path, args: list[str]) -> float:
    """Run ``fedsparse ARGS`` from ``checkout`` in ``workdir``; its wall time."""
    code = f"import sys; sys.argv = ['fedsparse', *{args!r}]; " \
           "from fedsparse.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def rounds_s(workdir: Path, since: float) -> float:
    """The rounds of the runs written in ``workdir`` after ``since`` (their summaries)."""
    return sum(json.loads(p.read_text())["rounds_s"]
               for p in (workdir / "runs").glob("*/summary.json") if p.stat().st_mtime > since)


def measure(checkout: Path, workdir: Path, compare: bool) -> tuple[float, float]:
    """One quickstart (or compare) from ``checkout``: (wall s, fixed s)."""
    scenario = checkout / "scenarios" / "quickstart.toml"
    since = time.time()
    if compare:
        for arm in ARMS:
            (workdir / f"{arm}.toml").write_text(scenario.read_text().replace(
                'name = "quickstart"', f'name = "qs-{arm}"'))
        wall = run_cli(checkout, workdir, ["compare", *(f"{a}.toml" for a in ARMS),
                                           "--set", "run.rounds=3", "--quiet"])
    else:
        wall = run_cli(checkout, workdir, ["run", str(scenario), "--quiet"])
    return wall, wall - rounds_s(workdir, since)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="runs per checkout (the first "
                                                            "in a new folder, reported apart)")
    parser.add_argument("--compare", action="store_true",
                        help="three quickstart arms at 3 rounds instead of one quickstart")
    parser.add_argument("--checkout", type=Path, action="append",
                        help="a fedsparse checkout (repeatable; default: this one)")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [HERE]]
    root = Path(tempfile.mkdtemp(prefix="fedsparse-startup-"))
    results: dict[Path, list[tuple[float, float]]] = {c: [] for c in checkouts}
    for _ in range(args.runs):
        for i, checkout in enumerate(checkouts):
            workdir = root / str(i)
            workdir.mkdir(exist_ok=True)
            results[checkout].append(measure(checkout, workdir, args.compare))
    what = "compare a b c --set run.rounds=3" if args.compare else "run quickstart"
    print(f"{what}: wall s / fixed s per run (first run in a new folder in brackets)")
    for checkout, runs in results.items():
        (first_wall, first_fixed), warm = runs[0], runs[1:]
        walls = ", ".join(f"{w:.1f}" for w, _ in warm)
        fixed = ", ".join(f"{f:.1f}" for _, f in warm)
        print(f"{checkout}: wall {walls} ({first_wall:.1f}); fixed {fixed} ({first_fixed:.1f})")
    print(f"(work folders under {root})")


if __name__ == "__main__":
    main()
