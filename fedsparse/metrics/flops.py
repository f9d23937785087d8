"""Training FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees every aten matmul/convolution of the forward and backward pass (elementwise
ops and the optimizer update are not counted, as in the FLOP counts of the papers). For a
dense model a step's count depends only on the architecture and the batch shape, so the
first step of each (architecture, shape) in a process runs under the counter and later
steps reuse the count: the counter's dispatch overhead (about 10x a small step) is paid
once per process, not once per client call.

The counts are those of the CPU whatever device a client trains on: the counter sees aten
ops, and CUDA runs some computations as other ops than the CPU (attention: CUDA's
``_scaled_dot_product_efficient_attention`` has a FLOP formula, the CPU's
``_scaled_dot_product_flash_attention_for_cpu`` has none), so a model on another device is
counted on a CPU copy of itself and of the step's batch (:func:`counted_on_cpu`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")
Loss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def counted(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` under the FLOP counter; return its result and the FLOPs it executed."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


def counted_on_cpu(model: nn.Module, loss: Loss, batch: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one forward and backward of ``loss`` on a CPU copy of ``model`` and
    ``batch``; the model and torch's CPU random state are left as they were."""
    probe = copy.deepcopy(model).cpu()
    on_cpu = tuple(t.cpu() for t in batch)
    with torch.random.fork_rng(devices=[]):
        _, total = counted(lambda: loss(probe, on_cpu).backward())
    return total


_MEASURED: dict[tuple[str, tuple[int, ...]], int] = {}


class StepFlops:
    """FLOPs of the training steps of one model, summed; counts cached per process."""

    def __init__(self, model: nn.Module, loss: Loss, architecture: str | None = None) -> None:
        self.model = model
        self.loss = loss  # what a step differentiates, for counting on a CPU copy
        # identifies the dense computation (default ``repr(model)``)
        self.architecture = architecture or repr(model)
        self.total = 0

    def run(self, batch: tuple[torch.Tensor, ...], step: Callable[[], T]) -> T:
        """Run ``step`` on ``batch`` and add its FLOPs, counted the first time the batch's
        shape is seen: the step itself for a model on the CPU, else a CPU copy of it."""
        key = (self.architecture, tuple(batch[0].shape))
        if key not in _MEASURED and next(self.model.parameters()).device.type != "cpu":
            _MEASURED[key] = counted_on_cpu(self.model, self.loss, batch)
        if key in _MEASURED:
            result = step()
        else:
            result, _MEASURED[key] = counted(step)
        self.total += _MEASURED[key]
        return result
