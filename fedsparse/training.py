"""Local training and evaluation of a classifier on in-memory tensors.

Plain minibatch SGD, the local solver of FedAvg (McMahan et al. 2017, Algorithm 1,
ClientUpdate): ``E`` local epochs, or exactly ``K`` local steps, of batch size ``B``.

The data stay on the CPU and the minibatch order is drawn there (the same on every device);
each minibatch is moved to ``device``, where the model must already be
(``fedsparse/device.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedsparse.device import CPU
from fedsparse.metrics.flops import StepFlops


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int  # examples processed, counting repeats across epochs
    loss: float  # mean minibatch loss over the steps
    flops: int  # measured training FLOPs (forward + backward)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: one fresh random permutation of ``range(n)`` per epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        yield from order.split(batch_size)


def num_steps(n: int, batch_size: int, epochs: int | None, steps: int | None) -> int:
    """``K`` if given, else ``E * ceil(n / B)``."""
    if steps is not None:
        return steps
    assert epochs is not None, "give local epochs or local steps"
    return epochs * math.ceil(n / batch_size)


def train_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float,
              batch_size: int, steps: int, generator: torch.Generator, momentum: float = 0.0,
              weight_decay: float = 0.0, grad_clip: float | None = None,
              device: torch.device = CPU) -> TrainResult:
    """Run ``steps`` SGD steps of cross-entropy on ``(x, y)`` in place, the gradient's norm
    over all parameters clipped at ``grad_clip`` if given; ``model`` is on ``device``."""
    if len(x) == 0 or steps == 0:
        return TrainResult(steps=0, examples=0, loss=float("nan"), flops=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    flops = StepFlops(model, cross_entropy)
    model.train()
    total_loss, examples = 0.0, 0
    stream = batches(len(x), batch_size, generator)
    for _ in range(steps):
        idx = next(stream)
        batch = (x[idx].to(device), y[idx].to(device))

        def step(batch: tuple[torch.Tensor, ...] = batch) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = cross_entropy(model, batch)
            loss.backward()
            return loss

        loss = flops.run(batch, step)
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        total_loss += float(loss.detach())
        examples += len(idx)
    return TrainResult(steps=steps, examples=examples, loss=total_loss / steps, flops=flops.total)


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The classification loss of a ``(x, y)`` batch."""
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2048, device: torch.device = CPU) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` (on ``device``) on ``(x, y)``."""
    if len(x) == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size].to(device))
        target = y[start:start + batch_size].to(device)
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return EvalResult(loss=loss_sum / len(x), accuracy=correct / len(x), num_examples=len(x))
