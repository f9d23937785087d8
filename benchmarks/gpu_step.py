"""One client's local epoch on CUDA vs the CPU: the training step of the MNIST MLP ``sgd``
program (FedAvg's ClientUpdate: ``fedsparse.training.train_sgd``, then ``evaluate``), timed
on each device, with the results checked to agree within float tolerance.

Runs where only torch is installed (no flwr, ray or mlflow: it imports torch and fedsparse's
plain training code). The data are MNIST-shaped (1x28x28, 10 classes) and seeded, the size
of one client's share; the model is the scenario's MLP (``hidden = [200, 200]``, McMahan et
al.'s 2NN) with the ``sgd`` program's defaults (lr 0.05, B = 32, E = 1). Both devices start
from the same weights and draw the same minibatches. Without a CUDA device it says so and
times the CPU alone.

    python benchmarks/gpu_step.py [--examples 600] [--epochs 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsparse.metrics import flops as step_flops
from fedsparse.training import EvalResult, TrainResult, evaluate, num_steps, train_sgd

INPUT, CLASSES = (1, 28, 28), 10
RTOL, ATOL = 1e-4, 1e-5  # float32 on two devices: same maths, other kernels


@dataclass
class Arm:
    device: torch.device
    seconds: list[float]
    train: TrainResult
    test: EvalResult
    weights: torch.Tensor  # the trained parameters, flat, on the CPU


def mlp(hidden: list[int], seed: int) -> nn.Module:
    """The scenario MLP (the layers of ``fedsparse/models/mlp.py``, which is not imported:
    it needs pydantic): flatten, Linear + ReLU per hidden layer, a linear head."""
    torch.manual_seed(seed)
    widths = [INPUT[0] * INPUT[1] * INPUT[2], *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], CLASSES))


def client_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *INPUT), generator=g), torch.randint(CLASSES, (n,), generator=g)


def run(device: torch.device, init: nn.Module, data: tuple[torch.Tensor, ...],
        args: argparse.Namespace) -> Arm:
    """``args.repeats`` timed local rounds from ``init`` (after one untimed warm-up)."""
    x, y, x_test, y_test = data
    steps = num_steps(len(x), args.batch_size, args.epochs, None)
    step_flops._MEASURED.clear()  # count this device's first step again
    seconds, result, model = [], None, None
    for _ in range(args.repeats + 1):
        model = copy.deepcopy(init).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        result = train_sgd(model, x, y, lr=args.lr, batch_size=args.batch_size, steps=steps,
                           generator=torch.Generator().manual_seed(args.seed), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    assert result is not None and model is not None
    test = evaluate(model, x_test, y_test, device=device)
    weights = nn.utils.parameters_to_vector(model.parameters()).detach().cpu()
    return Arm(device, seconds[1:], result, test, weights)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=600,
                        help="training examples of the client (MNIST over 100 clients: 600)")
    parser.add_argument("--epochs", type=int, default=1, help="E, local epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="B")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per device")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, y = client_data(args.examples, args.seed)
    x_test, y_test = client_data(max(1, args.examples // 5), args.seed + 1)
    init = mlp(args.hidden, args.seed)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        devices.append(torch.device("cuda", 0))
        print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    else:
        print(f"no CUDA device (torch {torch.__version__}, CUDA build: "
              f"{torch.version.cuda or 'none'}): timing the CPU only")
    arms = [run(d, init, (x, y, x_test, y_test), args) for d in devices]

    print(f"\none client's local round: {args.examples} examples, E = {args.epochs}, "
          f"B = {args.batch_size}, MLP {args.hidden}, {arms[0].train.steps} steps, "
          f"median of {args.repeats}\n")
    print("| device | s per round | ms per step | train loss | test acc | train FLOPs |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm in arms:
        median = statistics.median(arm.seconds)
        print(f"| {arm.device} | {median:.4f} | {1000 * median / arm.train.steps:.3f} | "
              f"{arm.train.loss:.6f} | {arm.test.accuracy:.4f} | {arm.train.flops} |")
    if len(arms) < 2:
        return 0
    cpu, cuda = arms
    gap = float((cpu.weights - cuda.weights).abs().max())
    agree = torch.allclose(cuda.weights, cpu.weights, rtol=RTOL, atol=ATOL) \
        and abs(cuda.train.loss - cpu.train.loss) <= ATOL + RTOL * abs(cpu.train.loss) \
        and cuda.train.flops == cpu.train.flops
    speedup = statistics.median(cpu.seconds) / statistics.median(cuda.seconds)
    print(f"\nCUDA vs CPU: {speedup:.2f}x; largest weight difference {gap:.3g} "
          f"(tolerance rtol {RTOL}, atol {ATOL}); FLOPs "
          f"{'equal' if cuda.train.flops == cpu.train.flops else 'DIFFER'}: "
          f"{'agree' if agree else 'DISAGREE'}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
