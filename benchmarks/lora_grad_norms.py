"""How large the whole LoRA gradient is (issue #19): per minibatch, the norm of the gradient of
every trainable parameter (adapters, head, SoRA's gates) of the task loss plus SoRA's L1 term,
at a run's initial model and at its last checkpoint, over the training data of its first
clients. It says whether a ``client.grad_clip`` binds: SoRA's release clips at 0.1.

    python benchmarks/lora_grad_norms.py runs/sora_release_clip-s0 [--clients 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fedsparse.checkpoint import Checkpoint
from fedsparse.data import client_data
from fedsparse.lora.sora import l1_penalty
from fedsparse.models import load_shared_state, scenario_model
from fedsparse.scenario import load_scenario
from fedsparse.training import batches, cross_entropy, num_steps
from strategies.loop import MODEL_PREFIX
from strategies.records import to_numpy
from strategies.server_app import initial_arrays


def norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
          eta: float, seed: int) -> list[float]:
    """The whole gradient's norm on each minibatch of one epoch over ``(x, y)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    gates = list(model.gates.values())
    stream = batches(len(x), batch_size, torch.Generator().manual_seed(seed))
    out = []
    for _ in range(num_steps(len(x), batch_size, 1, None)):
        idx = next(stream)
        model.zero_grad(set_to_none=True)
        loss = cross_entropy(model, (x[idx], y[idx]))
        (loss + (l1_penalty(gates, eta) if gates and eta else 0.0)).backward()
        out.append(float(torch.nn.utils.get_total_norm(
            [p.grad for p in params if p.grad is not None])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a LoRA run folder (scenario.toml, checkpoint.npz)")
    parser.add_argument("--clients", type=int, default=5, help="partitions 0..N-1 (default: 5)")
    args = parser.parse_args()
    scenario = load_scenario(args.run / "scenario.toml")
    client = scenario.client
    checkpoint = Checkpoint.load(args.run)
    last = {k.removeprefix(MODEL_PREFIX): torch.from_numpy(v)
            for k, v in checkpoint.arrays.items() if k.startswith(MODEL_PREFIX)}
    print("| model | minibatches | median | 10th percentile | 90th percentile | above the clip |")
    print("|---|---|---|---|---|---|")
    first = {k: torch.from_numpy(v) for k, v in to_numpy(initial_arrays(scenario)).items()}
    clients = [client_data(scenario.data, scenario.seed, pid) for pid in range(args.clients)]
    for label, state in (("initial", first), ("last checkpoint", last)):
        model = scenario_model(scenario)
        load_shared_state(model, state)
        model.train()
        found = np.array([n for pid, data in enumerate(clients)
                          for n in norms(model, data.x_train, data.y_train, client.batch_size,
                                         client.sora_l1, pid)])
        clip = client.grad_clip
        above = f"{100 * (found > clip).mean():.0f}% of > {clip}" if clip else "no clip"
        print(f"| {label} | {len(found)} | {np.median(found):.3f} | "
              f"{np.percentile(found, 10):.3f} | {np.percentile(found, 90):.3f} | {above} |")


if __name__ == "__main__":
    main()
