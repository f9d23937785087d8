"""Training FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees every aten matmul/convolution of the forward and backward pass (elementwise
ops and the optimizer update are not counted, as in the FLOP counts of the papers). A step's
count depends only on the batch shape for a dense model, so the first step of each batch
shape runs under the counter and later steps of that shape reuse the count.
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


class StepFlops:
    """Per-shape cache of the FLOPs of one training step."""

    def __init__(self) -> None:
        self._by_shape: dict[tuple[int, ...], int] = {}
        self.total = 0

    def run(self, shape: tuple[int, ...], step: Callable[[], T]) -> T:
        """Run ``step`` (counting it the first time ``shape`` is seen) and add its FLOPs."""
        if shape in self._by_shape:
            result = step()
        else:
            result, self._by_shape[shape] = counted(step)
        self.total += self._by_shape[shape]
        return result
