"""Training FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees every aten matmul/convolution of the forward and backward pass (elementwise
ops and the optimizer update are not counted, as in the FLOP counts of the papers). For a
dense model a step's count depends only on the architecture and the batch shape, so the
first step of each (architecture, shape) in a process runs under the counter and later
steps reuse the count: the counter's dispatch overhead (about 10x a small step) is paid
once per process, not once per client call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def counted(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` under the FLOP counter; return its result and the FLOPs it executed."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


_MEASURED: dict[tuple[str, tuple[int, ...]], int] = {}


class StepFlops:
    """FLOPs of the training steps of one model, summed; counts cached per process."""

    def __init__(self, architecture: str) -> None:
        self.architecture = architecture  # identifies the dense computation, e.g. repr(model)
        self.total = 0

    def run(self, shape: tuple[int, ...], step: Callable[[], T]) -> T:
        """Run ``step`` (counting it the first time ``shape`` is seen) and add its FLOPs."""
        key = (self.architecture, shape)
        if key in _MEASURED:
            result = step()
        else:
            result, _MEASURED[key] = counted(step)
        self.total += _MEASURED[key]
        return result
