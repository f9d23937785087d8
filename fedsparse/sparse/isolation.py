"""Per-task parameter isolation (Yildirim et al., CPAL 2024; ALGORITHMS.md §5.2 a, c, f).

One sparse subnetwork per task inside one dense store. While task ``t`` trains, the union of
the masks of tasks ``0..t-1`` is frozen: gradients there are zeroed before every step and,
after training, the store takes the task's trained values only where the task's mask is on.
An old task's weights are therefore bit-identical after any later task, and task ``j`` is
evaluated as ``store * mask_j``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsparse.sparse.masks import Mask


class TaskIsolation:
    """The dense store and the masks of the finished tasks."""

    def __init__(self, store: Mapping[str, torch.Tensor]) -> None:
        self.store = {name: w.detach().clone() for name, w in store.items()}
        self.task_masks: list[Mask] = []

    def frozen(self) -> Mask | None:
        """Union of all finished tasks' masks (None before the first task ends)."""
        if not self.task_masks:
            return None
        union = self.task_masks[0]
        for mask in self.task_masks[1:]:
            union = union.union(mask)
        return union

    @torch.no_grad()
    def working_copy(self, mask: Mask, params: Mapping[str, torch.Tensor]) -> None:
        """Load ``store * mask`` into ``params`` (old weights outside the new mask read 0)."""
        for name, m in mask.items():
            params[name].copy_(self.store[name] * m)

    @torch.no_grad()
    def zero_frozen_grads(self, params: Mapping[str, torch.Tensor]) -> None:
        frozen = self.frozen()
        if frozen is None:
            return
        for name, m in frozen.items():
            if params[name].grad is not None:
                params[name].grad.masked_fill_(m, 0.0)

    @torch.no_grad()
    def finish_task(self, mask: Mask, params: Mapping[str, torch.Tensor]) -> None:
        """Merge the task's trained weights into the store where its mask is on and they
        are not frozen; remember the mask."""
        frozen = self.frozen()
        for name, m in mask.items():
            writable = m if frozen is None else m & ~frozen[name]
            self.store[name] = torch.where(writable, params[name].detach(), self.store[name])
        self.task_masks.append(mask.copy())

    def task_weights(self, task: int) -> dict[str, torch.Tensor]:
        """``store * mask_task``: the subnetwork of a finished task."""
        return {name: self.store[name] * m for name, m in self.task_masks[task].items()}
