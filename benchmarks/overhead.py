"""Overhead of the Flower/Ray simulation over a plain sequential torch loop.

Both sides do exactly the same local work: the same clients sampled each round (the
strategy's seeded sampling), the same data, the same initial model, the same per-client
seeds, the same SGD steps, and the same sample-weighted average in the same order. The
script checks that both end with bit-identical weights, then prints the wall times:

- Flower: ``fedsparse run`` end to end (SuperLink start, Ray start, actor start-up, data
  loading in the actors, rounds, MLflow tracking, shutdown), and its parts;
- plain: one process, data loading, then the same rounds sequentially, torch on 1 thread
  (each Ray actor gets 1 CPU, so each client trains on 1 thread on both sides).

    python benchmarks/overhead.py [--rounds 30] [--clients 100] [--fraction 0.1]
                                  [--local-epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedsparse.cli import run_scenario
from fedsparse.data import client_data, dataset_shape, held_out_set
from fedsparse.data.partition import check_partition
from fedsparse.models import build_model
from fedsparse.protocol import derive_seed
from fedsparse.runtime_env import splits_dir
from fedsparse.scenario import Scenario, parse_scenario
from fedsparse.tracking.history import read_csv
from fedsparse.training import evaluate, num_steps, train_sgd
from strategies.server_app import build_strategy, initial_arrays

SCENARIO = """
name = "overhead"
seed = 0
[data]
dataset = "mnist"
num_clients = {clients}
partition = "dirichlet"
alpha = 0.5
[model]
name = "mlp"
hidden = [200, 200]
[strategy]
name = "fedavg"
fraction_train = {fraction}
fraction_evaluate = 0.0
[client]
program = "sgd"
lr = 0.05
batch_size = 32
local_epochs = {epochs}
[run]
rounds = {rounds}
eval_every = {rounds}
client_cpus = 1
[tracking]
experiment = "benchmark-overhead"
log_model = true
"""


def plain_loop(scenario: Scenario) -> tuple[dict[str, np.ndarray], float, float, float]:
    """The same FedAvg rounds in one process; (weights, load_s, rounds_s, accuracy)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    shape = dataset_shape(scenario.data)
    strategy = build_strategy(scenario)  # only for its seeded sampling
    clients = {pid: client_data(scenario.data, scenario.seed, pid)
               for r in range(1, scenario.run.rounds + 1) for pid in strategy.sample(r, "train")}
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    model = build_model(scenario.model, shape.input_shape, shape.num_classes)
    global_state = {k: v.numpy() for k, v in initial_arrays(scenario).to_torch_state_dict().items()}
    p = scenario.client
    for server_round in range(1, scenario.run.rounds + 1):
        results = []
        for pid in strategy.sample(server_round, "train"):
            data = clients[pid]
            model.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
            steps = num_steps(len(data.x_train), p.batch_size, p.local_epochs, p.local_steps)
            generator = torch.Generator().manual_seed(
                derive_seed(scenario.seed, pid, server_round))
            train_sgd(model, data.x_train, data.y_train, lr=p.lr, batch_size=p.batch_size,
                      steps=steps, generator=generator)
            results.append(({k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
                            len(data.x_train)))
        total = sum(n for _, n in results)
        new_state: dict[str, np.ndarray] = {}
        for state, n in results:  # same order and float32 arithmetic as the server's FedAvg
            for key, value in state.items():
                if key in new_state:
                    new_state[key] += value * (n / total)
                else:
                    new_state[key] = value * (n / total)
        global_state = new_state
    model.load_state_dict({k: torch.from_numpy(v) for k, v in global_state.items()})
    x, y = held_out_set(scenario.data, scenario.seed)
    accuracy = evaluate(model, x, y).accuracy
    return global_state, load_s, time.perf_counter() - start, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--local-epochs", type=int, default=1)
    args = parser.parse_args()
    scenario = parse_scenario(SCENARIO.format(rounds=args.rounds, clients=args.clients,
                                              fraction=args.fraction, epochs=args.local_epochs))
    workdir = Path(tempfile.mkdtemp(prefix="fedsparse-bench-"))
    os.chdir(workdir)
    # as `fedsparse run` does: the split checked and kept for the actors, which read their
    # client's indices from it instead of partitioning the dataset themselves
    check_partition(scenario.data, scenario.seed, "overhead", splits_dir(workdir))
    summary = run_scenario(scenario, run_dir=workdir / "run", quiet=True)
    rows = read_csv(workdir / "run/metrics.csv")
    flower_total = summary["total_wall_s"]
    first_round = rows[0]["round_s"]
    steady = [r["round_s"] for r in rows[1:]]

    weights, load_s, plain_rounds_s, plain_acc = plain_loop(scenario)
    from safetensors.numpy import load_file

    flower_weights = load_file(str(workdir / "run/model.safetensors"))
    identical = all(np.array_equal(weights[k], flower_weights[k]) for k in weights)
    plain_total = load_s + plain_rounds_s

    steady_flower = float(np.mean(steady)) if steady else float("nan")
    steady_plain = plain_rounds_s / scenario.run.rounds
    table = {
        "rounds": scenario.run.rounds,
        "local epochs": scenario.client.local_epochs,
        "clients per round": len(build_strategy(scenario).sample(1, "train")),
        "flower total wall s": flower_total,
        "  start-up (SuperLink, Flower, MLflow, Ray) s": flower_total - summary["rounds_s"],
        "  round 1 (actors start, data loading) s": first_round,
        "  rounds 2.. s": sum(steady),
        "plain total wall s": plain_total,
        "  data loading s": load_s,
        "  rounds s": plain_rounds_s,
        "ratio total (flower / plain)": flower_total / plain_total,
        "steady round flower s": steady_flower,
        "steady round plain s": steady_plain,
        "ratio steady round (flower / plain)": steady_flower / steady_plain,
        "final accuracy flower": summary["final_accuracy"],
        "final accuracy plain": plain_acc,
        "bit-identical final weights": identical,
    }
    width = max(map(len, table))
    for key, value in table.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    (workdir / "overhead.json").write_text(json.dumps(table, indent=1))
    print(f"\n(run folder: {workdir})")


if __name__ == "__main__":
    main()
