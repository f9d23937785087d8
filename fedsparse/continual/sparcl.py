"""SparCL's plugins put together on a learner: the step hooks and the epoch loop of a task.

- :class:`SparseHooks` is what a learner calls inside its step: after backward, the weight
  mask (and DGM, and per-task isolation) act on the gradients; after the optimiser step the
  weights outside the mask are zeroed again (ALGORITHMS.md §4.3 last point). For SNFS
  regrowth they also keep the momentum of the dense gradient, taken before the mask acts:
  the optimiser's own momentum only ever sees masked gradients, zero where weights would
  regrow.
- :func:`train_epochs` runs epochs ``e`` of the current task: DDR removes its scheduled
  examples at the start of an epoch, every minibatch of the remaining examples is one
  ``learner.observe``, DDR records whether each example was classified correctly, and the
  sparse and dense-equivalent FLOPs of every step are added up. TDM's mask updates are not
  here: they act between epochs (locally) or between rounds (on the server), see ``tdm.py``.

Every plugin is optional; with none of them this is plain dense training of the learner.
The task's examples stay on the CPU, as do DDR's statistics; each minibatch is moved to the
device the model is on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedsparse.continual.ddr import DataRemoval
from fedsparse.continual.dgm import GradientMasking
from fedsparse.continual.learners import Learner
from fedsparse.device import CPU
from fedsparse.metrics.sparse_flops import SparseFlops
from fedsparse.sparse.masks import Mask


class SparseHooks:
    def __init__(self, params: Mapping[str, torch.Tensor], mask: Mask | None = None,
                 dgm: GradientMasking | None = None, frozen: Mask | None = None,
                 dense_momentum: float | None = None) -> None:
        """``dense_momentum``: keep ``m <- dense_momentum * m + grad`` of the dense gradients
        in :attr:`momentum` (SNFS's signal, Dettmers & Zettlemoyer 2019)."""
        self.params = params
        self.mask = mask
        self.dgm = dgm
        self.frozen = frozen
        self.batch_index = 0
        self.dense_momentum = dense_momentum
        self.momentum: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.dense_momentum is not None:
            for name, param in self.params.items():
                buffer = self.momentum.get(name)
                self.momentum[name] = param.grad.clone() if buffer is None else \
                    buffer.mul_(self.dense_momentum).add_(param.grad)
        if self.mask is not None:
            if self.dgm is not None:
                self.dgm(self.params, self.mask, self.batch_index)
            else:
                self.mask.apply_to_grads(self.params)
        if self.frozen is not None:
            for name, m in self.frozen.items():
                self.params[name].grad.masked_fill_(m, 0.0)

    def after_step(self) -> None:
        if self.mask is not None:
            self.mask.apply(self.params)

    def densities(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per masked layer: weight density and the density of gradient entries computed."""
        if self.mask is None:
            dense = {name: 1.0 for name in self.params}
            return dense, dense
        weights = self.mask.densities()
        grads = self.dgm.densities(self.mask) if self.dgm is not None else weights
        return weights, grads


@dataclass
class EpochsResult:
    loss: float = 0.0  # mean step loss
    steps: int = 0
    examples: int = 0  # examples through forward + backward (current and replayed)
    flops: int = 0  # sparse training FLOPs
    dense_flops: int = 0  # the same steps on the dense model
    removed: int = 0  # examples removed by DDR in these epochs
    remaining: int = 0  # current-task examples left after them
    weight_density: float = 1.0  # over all masked layers, at the end
    grad_density: float = 1.0  # mean over the steps, over all masked layers


def _overall(densities: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    total = sum(sizes.values())
    return sum(densities[n] * sizes[n] for n in sizes) / total if total else 1.0


def train_epochs(learner: Learner, hooks: SparseHooks, x: torch.Tensor, y: torch.Tensor,
                 epochs: Sequence[int], *, batch_size: int, generator: torch.Generator,
                 flops: SparseFlops, ddr: DataRemoval | None = None,
                 drop_last: bool = False, device: torch.device = CPU) -> EpochsResult:
    """Train ``learner`` (its model on ``device``) on the current task's ``(x, y)`` for the
    task epochs ``epochs``; ``drop_last`` skips an epoch's last minibatch when it is short
    (SparCL's release does)."""
    result = EpochsResult()
    sizes = {name: p.numel() for name, p in hooks.params.items()}
    grad_density_sum = 0.0
    learner.model.train()
    for epoch in epochs:
        if ddr is not None:
            result.removed += ddr.remove(epoch)
        kept = ddr.kept if ddr is not None else torch.arange(len(x))
        order = kept[torch.randperm(len(kept), generator=generator)]
        for batch_index, idx in enumerate(order.split(batch_size)):
            if drop_last and len(idx) < batch_size:
                continue
            hooks.batch_index = batch_index
            yb = y[idx].to(device)
            step = learner.observe(x[idx].to(device), yb)
            if ddr is not None:
                ddr.record(idx, (step.logits.argmax(dim=1) == yb).cpu())
            weights, grads = hooks.densities()
            result.flops += step.examples * flops.per_example(weights, grads)
            result.dense_flops += step.examples * flops.dense
            result.loss += step.loss
            result.examples += step.examples
            result.steps += 1
            grad_density_sum += _overall(grads, sizes)
    result.remaining = len(ddr.kept) if ddr is not None else len(x)
    weights, _ = hooks.densities()
    result.weight_density = _overall(weights, sizes)
    if result.steps:
        result.loss /= result.steps
        result.grad_density = grad_density_sum / result.steps
    return result
