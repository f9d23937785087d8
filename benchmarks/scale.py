"""Scale: start-up, round time and memory of Ray simulations from 1,000 to 100,000 clients.

Each arm is one ``fedsparse run`` (the real CLI, Ray simulation, 100 clients sampled per
round, no federated evaluation, centralised evaluation after every round so that all rounds
do the same work), in a folder of its own (a cold start: no kept split, a new MLflow
store), measured from outside while it runs:

- ``first round s``: from the command's start to the start of round 1 (the time the round's
  line appeared minus the round's own ``round_s``): the CLI's check of the split (an image
  dataset's partitioner is asked for every client: O(clients), once per split, which later
  runs in the folder read back), SuperLink, ``flwr run``, Ray, Flower's own node set-up,
  the ServerApp's set-up and the one-per-actor warm-up;
- ``round s``: the mean ``round_s`` of rounds 2 to 10 (the ServerApp's own clock);
- ``peak PSS MiB``: the largest proportional set size of the whole process tree (shared
  pages counted once, split among the processes sharing them), sampled every 0.5 s;
- ``PSS r1`` / ``PSS r10``: the tree's PSS when round 1 and round 10 finished (``--json``
  has it after every round);
- ``state MiB``: the run folder's client state store at the end (stateful arms).

    python benchmarks/scale.py [--arms synthetic-1k,synthetic-10k,...] [--rounds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedsparse.tracking.history import read_csv

REPO = Path(__file__).resolve().parents[1]
PER_ROUND = 100
ROUND_LINE = re.compile(r"^round\s+(\d+)/(\d+)")


@dataclass(frozen=True)
class Arm:
    name: str
    scenario: str  # a file under scenarios/
    clients: int
    overrides: tuple[str, ...] = ()
    unset: tuple[str, ...] = ()


MNIST = ("data.partition='iid'",)
ARMS = {a.name: a for a in [
    Arm("synthetic-1k", "synthetic.toml", 1_000),
    Arm("synthetic-10k", "synthetic.toml", 10_000),
    Arm("synthetic-100k", "synthetic.toml", 100_000),
    Arm("mnist-1k", "quickstart.toml", 1_000, MNIST, ("data.alpha",)),
    Arm("mnist-10k", "quickstart.toml", 10_000, MNIST, ("data.alpha",)),
    Arm("scaffold-mnist-10k", "quickstart.toml", 10_000, (
        *MNIST, "strategy.name='scaffold'", "client.program='controlled_sgd'",
        "client.local_steps=10"), ("data.alpha", "client.local_epochs")),
]}


@dataclass
class Measured:
    peak_pss: int = 0
    at_round: dict[int, int] = field(default_factory=dict)
    seen_at: dict[int, float] = field(default_factory=dict)


def tree_pss(root: psutil.Process) -> int:
    """PSS of ``root`` and all its descendants (bytes)."""
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_full_info().pss
    return total


def run_arm(arm: Arm, rounds: int, workdir: Path) -> dict[str, object]:
    run_dir = workdir / "runs" / arm.name
    command = [str(Path(sys.executable).parent / "fedsparse"), "run",
               str(REPO / "scenarios" / arm.scenario),
               "--run-dir", str(run_dir), "--summary", str(run_dir.with_suffix(".json")),
               "--set", f"data.num_clients={arm.clients}",
               "--set", f"strategy.fraction_train={PER_ROUND / arm.clients!r}",
               "--set", f"run.rounds={rounds}", "--set", "run.eval_every=1",
               "--set", "strategy.fraction_evaluate=0.0",
               "--set", "tracking.log_model=false"]
    for override in arm.overrides:
        command += ["--set", override]
    for key in arm.unset:
        command += ["--unset", key]
    measured = Measured()
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            measured.peak_pss = max(measured.peak_pss, tree_pss(root))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        match = ROUND_LINE.match(line.strip())
        if match:
            server_round = int(match.group(1))
            measured.seen_at[server_round] = time.perf_counter() - started
            measured.at_round[server_round] = tree_pss(root)
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{arm.name}: fedsparse run exited with {proc.returncode}; see "
                         f"{run_dir}/flower.log")
    rows = read_csv(run_dir / "metrics.csv")
    round_s = {int(r["round"]): float(r["round_s"]) for r in rows}
    steady = [round_s[r] for r in range(2, rounds + 1)]
    state = run_dir / "client-state"
    state_bytes = sum(p.stat().st_size for p in state.rglob("*") if p.is_file()) \
        if state.exists() else 0
    mib = 2**20
    return {
        "arm": arm.name, "clients": arm.clients,
        "first_round_s": measured.seen_at[1] - round_s[1],
        "round_s": sum(steady) / len(steady),
        "total_s": time.perf_counter() - started,
        "peak_pss_mib": measured.peak_pss / mib,
        "pss_r1_mib": measured.at_round[1] / mib,
        "pss_last_mib": measured.at_round[rounds] / mib,
        "pss_by_round_mib": [round(measured.at_round[r] / mib, 1)
                             for r in sorted(measured.at_round)],
        "state_mib": state_bytes / mib,
        "accuracy": float(rows[-1].get("accuracy", float("nan"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = args.arms.split(",")
    unknown = sorted(set(names) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; allowed: {', '.join(ARMS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="fedsparse-scale-") as tmp:
        for name in names:
            workdir = Path(tmp) / name  # a folder of its own: every arm starts cold
            workdir.mkdir()
            result = run_arm(ARMS[name], args.rounds, workdir)
            results.append(result)
            print(json.dumps(result), flush=True)
    header = ("| arm | clients | first round s | round s | peak PSS MiB | PSS r1 MiB | "
              f"PSS r{args.rounds} MiB | state MiB | accuracy |")
    print("\n" + header + "\n|" + "---|" * 9)
    for r in results:
        print(f"| {r['arm']} | {r['clients']:,} | {r['first_round_s']:.1f} | "
              f"{r['round_s']:.2f} | {r['peak_pss_mib']:.0f} | {r['pss_r1_mib']:.0f} | "
              f"{r['pss_last_mib']:.0f} | {r['state_mib']:.0f} | {r['accuracy']:.4f} |")
    base = next((r for r in results if r["arm"] == "synthetic-1k"), None)
    top = next((r for r in results if r["arm"] == "synthetic-100k"), None)
    if base and top:
        print(f"\nstart-up 100k / 1k: {top['first_round_s'] / base['first_round_s']:.2f}x; "
              f"round 100k / 1k: {top['round_s'] / base['round_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
