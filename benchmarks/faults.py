"""Fault tolerance (issue #15 point 7): final accuracy and wall time of FedAvg and SCAFCOM
top-1% when 0, 10, 20 or 40% of the client calls fail, split evenly over the four faults
of ``[faults]`` (crash, hang, corrupt, unavailable), on the Ray simulation.

Setting: the two arms of ``scenarios/compression/dirichlet/`` (``fedavg.toml``,
``scafcom_top1.toml``: MNIST with Dirichlet(0.3) label skew, MLP 784-200-200-10, K = 10 local
SGD steps of batch 32 at lr 0.05; SCAFCOM with top-1% per tensor, float16 values, beta 0.5,
eta_g 2) on 20 clients with 10 sampled per round (a quickstart-sized federation), 100 rounds,
centralised evaluation every 10 rounds, no federated evaluation, ``run.round_timeout_s`` 3 s,
one Ray actor per client sampled (a hung client holds up only itself). The faults of a call
are drawn from the scenario's seed, so both arms meet the same faults at each level.

Printed: per arm and level the final accuracy and its change against the same arm at the
first level (no faults, by default), the rounds that counted, the replies dropped (and how
many calls have in ``clients.csv`` the status their draw says), the wall time of the rounds
and of the whole command, and their ratios against the same arm at the first level. Every
run is tracked in the MLflow experiment ``faults``.

    python benchmarks/faults.py [--rounds 100] [--levels 0 0.1 0.2 0.4] [--timeout 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clients.faults import draw, recorded_as
from fedsparse.experiments import new_run_dir, run_scenario
from fedsparse.scenario import FAULTS, Scenario, load_scenario
from fedsparse.tracking.history import read_csv
from strategies.server_app import build_strategy

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "compression" / "dirichlet"
ARMS = {"FedAvg": "fedavg", "SCAFCOM top-1%": "scafcom_top1"}
CLIENTS, PER_ROUND = 20, 10


def scenario(arm: str, level: float, rounds: int, timeout_s: float) -> Scenario:
    """An arm on the benchmark's federation, with ``level`` of its calls faulted."""
    overrides = [f"name={arm.replace('_', '-')}-faults{round(100 * level)}",
                 f"data.num_clients={CLIENTS}", f"strategy.fraction_train={PER_ROUND / CLIENTS}",
                 f"run.rounds={rounds}", "run.eval_every=10", f"run.round_timeout_s={timeout_s}",
                 f"run.num_cpus={PER_ROUND}", "tracking.experiment=faults"]
    if level > 0:
        overrides += [f"faults.{fault}={level / len(FAULTS)}" for fault in FAULTS]
    return load_scenario(SCENARIOS / f"{arm}.toml", overrides)


def as_drawn(scn: Scenario, clients: list[dict[str, Any]]) -> tuple[int, int]:
    """(calls whose status is the one their draw says, calls): did the faults stay the ones
    drawn, or did a hung client also hold up others?"""
    strategy = build_strategy(scn)
    expected = {}
    for r in range(1, scn.run.rounds + 1):
        for pid in strategy.sample(r, "train"):
            expected[r, pid] = recorded_as(draw(scn.faults, pid, r, "train")
                                           if scn.faults else None)
    observed = {(c["round"], c["partition_id"]): c["status"] for c in clients
                if c["phase"] == "train"}
    return sum(observed.get(k) == v for k, v in expected.items()), len(expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    parser.add_argument("--timeout", type=float, default=3.0, help="run.round_timeout_s")
    args = parser.parse_args()
    rows = []
    for label, arm in ARMS.items():
        base: dict[str, Any] | None = None
        for level in args.levels:
            scn = scenario(arm, level, args.rounds, args.timeout)
            run_dir = new_run_dir(scn)
            summary = run_scenario(scn, run_dir=run_dir, quiet=True)
            matched, calls = as_drawn(scn, read_csv(run_dir / "clients.csv"))
            base = base or summary
            rows.append((label, level, summary, base, matched, calls))
            print(f"{label} at {level:.0%} faults: accuracy {summary['final_accuracy']:.4f}, "
                  f"{summary['total_wall_s']:.0f} s ({run_dir})", flush=True)
    print(f"\n{args.rounds} rounds, {PER_ROUND} of {CLIENTS} clients per round, round timeout "
          f"{args.timeout:g} s; faults split evenly over {', '.join(FAULTS)}\n")
    print("| arm | faults | final accuracy | vs first level (points) | rounds counted "
          "| replies dropped | statuses as drawn | rounds s | ratio | total wall s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, level, s, b, matched, calls in rows:
        print(f"| {label} | {level:.0%} | {s['final_accuracy']:.4f} "
              f"| {100 * (s['final_accuracy'] - b['final_accuracy']):+.2f} "
              f"| {s['rounds'] - s['rounds_failed']}/{s['rounds']} | {s['replies_dropped']} "
              f"| {matched}/{calls} | {s['rounds_s']:.0f} | {s['rounds_s'] / b['rounds_s']:.2f} "
              f"| {s['total_wall_s']:.0f} | {s['total_wall_s'] / b['total_wall_s']:.2f} |")


if __name__ == "__main__":
    main()
