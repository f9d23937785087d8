"""TDM: task-aware dynamic masking (SparCL, Wang et al. NeurIPS 2022, Algorithm 1;
ALGORITHMS.md §4.3, the released schedule).

Importance of an active weight: ``|w| + lambda * |g|`` (``g``: the gradient in ``.grad`` at
the update, i.e. the last minibatch's, already gradient-masked; the release merges the
paper's two terms for current and buffer data into this one). An update prunes each masked
layer to the *lower-bound* sparsity by importance, then regrows inactive positions at random
up to the *upper-bound* sparsity; regrown weights start at zero.

The schedule counts epochs within the current task (it restarts at 0 for every task), with
``s`` the target sparsity:

- epoch 0: prune to ``s``, regrow to ``s - boost`` (a capacity boost at the task start);
- every ``update_every`` epochs before ``freeze_at``: prune to ``s + drop``, regrow to ``s``;
- epoch ``freeze_at``: prune to ``s`` without regrowth; the mask is then frozen until the
  task ends.

The release uses s = 0.75, boost = drop = 0.01, update_every = 5, freeze_at = 45 of 50
epochs. In a federation the same schedule runs on the server over rounds within a task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsparse.sparse.dst import grow, keep_top
from fedsparse.sparse.masks import Mask, keep_count


@dataclass(frozen=True)
class TDMSchedule:
    sparsity: float
    update_every: int = 5
    freeze_at: int = 45
    boost: float = 0.01
    drop: float = 0.01

    def bounds(self, epoch: int) -> tuple[float, float] | None:
        """``(lower, upper)`` sparsity of the update at this epoch of the task, or None."""
        s = self.sparsity
        if epoch == 0:
            return s, max(0.0, s - self.boost)
        if epoch == self.freeze_at:
            return s, s
        if epoch < self.freeze_at and epoch % self.update_every == 0:
            return min(1.0, s + self.drop), s
        return None


@torch.no_grad()
def tdm_update(mask: Mask, params: Mapping[str, torch.Tensor],
               grads: Mapping[str, torch.Tensor], lower: float, upper: float, lam: float,
               generator: torch.Generator) -> Mask:
    """Prune every layer to sparsity ``lower`` by ``|w| + lam*|g|``, regrow at random to
    sparsity ``upper``; pruned weights are zeroed in place, regrown ones are zero."""
    updated = {}
    for name, m in mask.items():
        weight = params[name]
        score = weight.abs() + lam * grads[name].abs()
        kept = keep_top(m, score, keep_count(m.numel(), 1.0 - lower))
        target = keep_count(m.numel(), 1.0 - upper)
        new = grow(kept, max(0, target - int(kept.sum())), "random", generator)
        weight.mul_(kept)
        updated[name] = new
    return Mask(updated)
