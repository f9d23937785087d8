"""DGM: dynamic gradient masking (SparCL, Wang et al. NeurIPS 2022, Section 3.3;
ALGORITHMS.md §4.4, the release's ``--gradient_efficient_mix`` mode).

On every ``every``-th minibatch of an epoch (batch 0 included) the weight mask is applied to
the gradients, then each masked layer keeps only its ``round(density * n)`` largest-|grad|
entries (``density`` is a fraction of the whole tensor, as in the release: at 75% weight
sparsity a gradient density of 0.2 keeps about 80% of the active weights' gradients), and
that binary gradient mask, within the weight mask, is stored (a density above the active
share cannot open pruned positions). On the other minibatches the gradients are multiplied
by the stored mask. Ties go to the lower index.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedsparse.sparse.masks import Mask, keep_count, top_positions


class GradientMasking:
    def __init__(self, density: float, every: int) -> None:
        self.density = density
        self.every = every
        self.masks: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, params: Mapping[str, torch.Tensor], weight_mask: Mask,
                 batch_index: int) -> None:
        """Mask the gradients of the masked layers in place, for minibatch ``batch_index``."""
        if batch_index % self.every == 0 or not self.masks:
            weight_mask.apply_to_grads(params)
            for name in weight_mask:
                grad = params[name].grad
                flat = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
                flat[top_positions(grad.abs(), keep_count(grad.numel(), self.density))] = True
                self.masks[name] = flat.view_as(grad) & weight_mask[name]
        for name, m in self.masks.items():
            params[name].grad.mul_(m)

    def densities(self, weight_mask: Mask) -> dict[str, float]:
        """Fraction of each layer's entries whose gradient may be non-zero: the stored
        gradient mask within the weight mask (the weight mask alone before the first call)."""
        return {name: float((self.masks.get(name, m) & m).float().mean())
                for name, m in weight_mask.items()}
