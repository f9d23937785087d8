"""pFedGate: personalised sparse model adaptation with a per-client gating layer (Chen, Yao,
Gao, Ding, Li; ICML 2023, arXiv 2305.02776; ALGORITHMS.md §2).

A client holds the shared base model ``theta`` (aggregated by the server) and its own gating
layer ``phi_i`` (never sent). For each minibatch ``x`` (Algorithm 1, client part):

1. gates ``g = mean_batch sigmoid(phi_i(x))``, one per block of ``theta``
   (:class:`~fedsparse.personal.blocks.BlockPartition`), clipped from below at
   ``s_min = min(max(1/B, 0.1), s)``;
2. block selection under the client's budget ``s`` (:func:`select_blocks`): importance
   ``round(10 * g)``, a 0-1 knapsack over block sizes in the linear and the other blocks
   separately, every tensor's first block always kept;
3. the adapted model ``theta * (keep * g)`` (each kept block scaled by its gate, dropped
   blocks zero), so that the loss is differentiable in ``theta`` and ``phi_i`` alike;
4. cross-entropy, one backward pass, gradient-norm clipping (10 in the release) on
   ``phi_i`` and ``theta`` separately, one SGD step of each (momentum 0.9, weight decay
   5e-4 in the release; the momentum of both persists across rounds).

Choices, where the release is not the only reading (README "Notes and deviations"):

- gating is batch-level, as in the release (one sparse model per minibatch, also at test
  time; the paper describes sample-level gating);
- the input normalisation is a ``BatchNorm2d`` over the input channels (the release uses a
  SwitchNorm2d, which mixes instance, layer and batch statistics);
- ``gate_gradient = "fedsparse"`` (default): a kept block is scaled by the gate clipped at
  ``s_min``, the clip straight-through (its gradient is 1 below ``s_min`` too). ``"release"``:
  the release's multiplier ``g * (1 + g_c - stop_grad(g_c)) * keep`` with ``g_c`` the plainly
  clipped gate (``gated_learner.py``, the straight-through mask of its top-k selection): the
  value is the unclipped gate ``g``, the gradient ``1 + g`` where ``g >= s_min`` and 1 below
  (at ``s = 1`` the release selects nothing and scales by ``g``: gradient 1);
- ``seperate_trans`` (the release's option, its spelling; used by its FEMNIST and CIFAR-100
  scripts; needs ``gate_gradient = "release"``): a second head of the gating layer (a copy of
  its linear layer and score normalisation, same initial weights) gives the blocks' scales
  ``t``, the gates only pick the blocks: the multiplier is ``t * (1 + g_c - stop_grad(g_c))
  * keep``;
- with ``B = 1`` every block is a tensor's first block, so the whole model is kept (the
  release keeps none: it finds first blocks by a ``sub0`` name that ``B = 1`` never gives,
  and its capacity ``(s - s_min) * size`` is 0 since ``s_min = s`` there; a release bug);
- ``budget_rule = "exact"`` (default): in each group the kept blocks, first blocks
  included, hold at most ``floor(s * size of the group)`` parameters, so the density is
  the budget up to block granularity (but never below the first blocks' share, about
  ``1/B``: at ``s = 0.1`` and ``B = 5`` the density is about 0.2). ``"release"``: the
  release's capacity ``round((s - s_min) * size of the non-first blocks)`` for the selected
  blocks on top of the first ones (density about ``0.04 + 0.8 s`` for ``B = 5``), and no
  selection at ``s = 1``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedsparse.device import CPU, cpu_numpy
from fedsparse.metrics.flops import counted
from fedsparse.metrics.sparse_flops import SparseFlops
from fedsparse.personal.blocks import BlockPartition
from fedsparse.personal.knapsack import SOLVERS, Solver
from fedsparse.schema import ReleaseChoice

BudgetRule = Literal["exact", "release"]
IMPORTANCE_SCALE = 10  # gates in [0, 1] -> integer importance 0..10


class GatingLayer(nn.Module):
    """``phi_i``: input normalisation, flatten, one linear layer to one score per block,
    batch normalisation of the scores (the release's ``GatingLayer``); with
    ``seperate_trans`` a second linear layer and normalisation, copies of the first, give the
    blocks' scales."""

    def __init__(self, input_shape: tuple[int, ...], num_blocks: int,
                 seperate_trans: bool = False) -> None:
        super().__init__()
        channels = input_shape[0] if len(input_shape) == 3 else 1
        self.input_norm = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(math.prod(input_shape), num_blocks)
        self.score_norm = nn.BatchNorm1d(num_blocks)
        self.trans = nn.Sequential(copy.deepcopy(self.linear), copy.deepcopy(self.score_norm)) \
            if seperate_trans else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample block logits of the gates and of the scales (``None`` without
        ``seperate_trans``), each ``[batch, num_blocks]``."""
        images = x if x.dim() == 4 else x.reshape(len(x), 1, 1, -1)
        features = self.input_norm(images).flatten(1)
        trans = self.trans(features) if self.trans is not None else None
        return self.score_norm(self.linear(features)), trans


def min_gate(blocks_per_tensor: int, budget: float) -> float:
    """``s_min = min(max(1/B, 0.1), s)``."""
    return min(max(1.0 / blocks_per_tensor, 0.1), budget)


def block_scale(g: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, s_min: float,
                rule: ReleaseChoice, budget: float = 0.0) -> torch.Tensor:
    """The multiplier of each block in the adapted model, from the gates ``g`` (mean sigmoid
    over the batch), the scales ``t`` (``g`` itself without ``seperate_trans``) and the kept
    blocks (see the module's docstring for the two rules; the release selects nothing at
    ``budget >= 1`` and scales by ``t`` alone there)."""
    if rule == "fedsparse":
        return keep * (g + (g.clamp(min=s_min) - g).detach())
    if budget >= 1.0:
        return keep * t
    clipped = g.clamp(min=s_min)
    return keep * t * (1 + clipped - clipped.detach())


def select_blocks(partition: BlockPartition, importance: np.ndarray, budget: float,
                  solver: Solver = "greedy", rule: BudgetRule = "exact",
                  s_min: float = 0.0) -> torch.Tensor:
    """Boolean over blocks: every first block, plus the knapsack's choice in each group."""
    keep = partition.first.clone()
    if rule == "release" and budget >= 1.0:
        return torch.ones(len(partition), dtype=torch.bool)
    sizes = partition.sizes.numpy()
    for group in ("linear", "other"):
        members = partition.group(group)
        candidates = (members & ~partition.first).numpy()
        if not candidates.any():
            continue
        if rule == "exact":
            capacity = math.floor(budget * sizes[members.numpy()].sum() + 1e-9) \
                - int(sizes[(members & partition.first).numpy()].sum())
        else:
            capacity = round((budget - s_min) * sizes[candidates].sum())
        chosen = SOLVERS[solver](importance[candidates], sizes[candidates], max(0, capacity))
        keep[torch.from_numpy(np.flatnonzero(candidates)[chosen])] = True
    return keep


@dataclass
class GatedBatch:
    """What one gated forward pass decided."""

    logits: torch.Tensor
    keep: torch.Tensor  # bool per block
    gates: torch.Tensor  # clipped gate per block (no grad)
    density: float  # share of the parameters in kept blocks
    loss: float = float("nan")  # the minibatch's cross-entropy, once a step computed it


@dataclass
class RoundStats:
    """A local round of gated training."""

    steps: int = 0
    examples: int = 0
    loss: float = 0.0  # mean over steps
    density: float = 0.0  # mean share of parameters used per step
    active: torch.Tensor | None = None  # bool per block: kept in any step of the round
    layer_density: dict[str, float] = field(default_factory=dict)  # mean per tensor
    flops: int = 0  # training FLOPs at the kept blocks' density, gating layer included
    dense_flops: int = 0  # the same steps with the dense base model


def gating_flops(gating: GatingLayer, input_shape: tuple[int, ...]) -> int:
    """Training FLOPs of the gating layer per example (forward and backward, measured)."""
    probe = copy.deepcopy(gating).cpu().train()

    def forward_backward() -> None:
        scores = [s for s in probe(torch.zeros(2, *input_shape)) if s is not None]
        sum(s.sum() for s in scores).backward()

    _, total = counted(forward_backward)
    return total // 2


class GatedModel:
    """The base model ``theta`` seen through a client's gating layer and budget."""

    def __init__(self, model: nn.Module, partition: BlockPartition, budget: float, *,
                 gating: GatingLayer | None, solver: Solver = "greedy",
                 rule: BudgetRule = "exact", gradient: ReleaseChoice = "fedsparse") -> None:
        if gating is not None and gating.trans is not None and gradient != "release":
            raise ValueError('seperate_trans needs gate_gradient = "release": with "fedsparse" '
                             'the gates would get no gradient')
        self.model = model
        self.partition = partition
        self.budget = budget
        self.gating = gating  # None: every gate fixed at 1 (an ablation)
        self.solver = solver
        self.rule = rule
        self.gradient = gradient
        self.s_min = min_gate(partition.blocks_per_tensor, budget)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, t)`` for the batch ``x``: the mean sigmoid gates and scales (``t = g``
        without ``seperate_trans``; both fixed at 1 without a gating layer)."""
        if self.gating is None:
            ones = torch.ones(len(self.partition), device=x.device)
            return ones, ones
        logits, trans = self.gating(x)
        g = torch.sigmoid(logits).mean(dim=0)
        return g, g if trans is None else torch.sigmoid(trans).mean(dim=0)

    def forward(self, x: torch.Tensor) -> GatedBatch:
        g, t = self.gates(x)
        clipped = g.detach().clamp(min=self.s_min)
        importance = np.rint(cpu_numpy(clipped) * IMPORTANCE_SCALE).astype(np.int64)
        keep = select_blocks(self.partition, importance, self.budget, self.solver, self.rule,
                             self.s_min)
        scale = self.partition.expand(block_scale(g, t, keep.to(g.device, g.dtype), self.s_min,
                                                  self.gradient, self.budget))
        params = {name: p * scale[name] for name, p in self.model.named_parameters()}
        logits = functional_call(self.model, params, (x,))
        return GatedBatch(logits, keep, clipped, self.partition.kept_fraction(keep))

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.parameters()
        if self.gating is not None:
            yield from self.gating.parameters()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.gating is not None:
            self.gating.train(mode)


class GatedLearner:
    """Local training of ``theta`` and ``phi_i`` (Algorithm 1's client update)."""

    def __init__(self, gated: GatedModel, *, lr: float, lr_gating: float, momentum: float,
                 weight_decay: float, grad_clip: float | None,
                 flops: SparseFlops | None = None) -> None:
        self.gated = gated
        self.grad_clip = grad_clip
        self.flops = flops
        self.gating_flops = 0 if gated.gating is None or flops is None else \
            gating_flops(gated.gating, flops.input_shape)
        self.optimizer = torch.optim.SGD(gated.model.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.gating_optimizer = None if gated.gating is None else torch.optim.SGD(
            gated.gating.parameters(), lr=lr_gating, momentum=momentum,
            weight_decay=weight_decay)

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.gating_optimizer) if o is not None]

    def step(self, x: torch.Tensor, y: torch.Tensor, *, train_model: bool = True) -> GatedBatch:
        """One minibatch: gate, select, adapted forward, backward, clip, step."""
        for optimizer in self._optimizers():
            optimizer.zero_grad(set_to_none=True)
        batch = self.gated.forward(x)
        loss = F.cross_entropy(batch.logits, y)
        loss.backward()
        groups = [(self.optimizer, self.gated.model)] if train_model else []
        if self.gating_optimizer is not None:
            groups.append((self.gating_optimizer, self.gated.gating))
        for optimizer, module in groups:
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip)
            optimizer.step()
        batch.logits = batch.logits.detach()
        batch.loss = float(loss.detach())
        return batch

    def fit(self, x: torch.Tensor, y: torch.Tensor, batches: Iterator[torch.Tensor],
            steps: int, *, train_model: bool = True, device: torch.device = CPU) -> RoundStats:
        """``steps`` minibatches of ``(x, y)`` drawn from ``batches``, each moved to
        ``device`` (where the models are); minibatches of one example are skipped while a
        gating layer trains (batch normalisation needs two)."""
        self.gated.train()
        if not train_model:
            self.gated.model.eval()
        stats = RoundStats(active=self.gated.partition.first.clone())
        per_tensor = {name: 0.0 for name in self.gated.partition.shapes}
        for _ in range(steps):
            idx = next(batches)
            if len(idx) < 2 and self.gated.gating is not None:
                continue
            batch = self.step(x[idx].to(device), y[idx].to(device), train_model=train_model)
            stats.steps += 1
            stats.examples += len(idx)
            stats.loss += batch.loss
            stats.density += batch.density
            stats.active |= batch.keep
            densities = self.gated.partition.tensor_densities(batch.keep)
            for name, d in densities.items():
                per_tensor[name] += d
            if self.flops is not None:
                sparse = self.flops.per_example(densities, densities)
                stats.flops += len(idx) * (sparse + self.gating_flops)
                stats.dense_flops += len(idx) * (self.flops.dense + self.gating_flops)
        stats.loss = stats.loss / stats.steps if stats.steps else float("nan")
        if stats.steps:
            stats.density /= stats.steps
            stats.layer_density = {n: d / stats.steps for n, d in per_tensor.items()}
        return stats

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 device: torch.device = CPU) -> tuple[float, float, float]:
        """``(loss, accuracy, density)`` of the gated model, gated per test batch, each a mean
        over the test examples (NaN for an empty test split)."""
        if len(x) == 0:
            return float("nan"), float("nan"), float("nan")
        self.gated.train(False)
        loss_sum, correct, density = 0.0, 0, 0.0
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            batch = self.gated.forward(xb)
            loss_sum += float(F.cross_entropy(batch.logits, yb, reduction="sum"))
            correct += int((batch.logits.argmax(dim=1) == yb).sum())
            density += batch.density * len(xb)
        return loss_sum / len(x), correct / len(x), density / len(x)
