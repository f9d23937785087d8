"""Weight masks: which entries of each sparse layer are active.

A :class:`Mask` maps a parameter name (``"1.weight"``) to a boolean tensor of that
parameter's shape. Masked layers are the weights of ``nn.Linear`` and ``nn.Conv*`` modules
(biases and normalisation stay dense, as in SparCL's release and Yildirim et al.'s
``Masking``); any of them can be left dense by name. Counts are exact: a layer of ``n``
entries at density ``d`` keeps ``round(d * n)`` of them, so a density is a fact, not an
expectation (Yildirim et al. draw Bernoulli(d) masks; this is the one deviation).

Initial masks (ALGORITHMS.md §4.3, §5.2):

- uniform: every layer at the target density ``D``;
- ERK (Evci et al. 2020, "Rigging the Lottery", eq. for Erdős–Rényi-Kernel): layer density
  ``eps * sum(dims) / prod(dims)``, ``eps`` solved so that the kept entries total ``D`` of
  all masked entries; layers whose density would exceed 1 are made dense and ``eps`` is
  solved again over the rest;
- positions drawn at random (DST) or by magnitude of the initial weights (SparCL's one-shot
  pruning of the random initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

SPARSE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sparse_parameters(model: nn.Module, dense: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of the model's linear and convolution layers, minus the modules in ``dense``."""
    dense = set(dense)
    found = {name for name, module in model.named_modules() if isinstance(module, SPARSE_MODULES)}
    unknown = dense - found
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not linear/conv modules of the "
                         f"model; allowed: {sorted(found)}")
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if name in found and name not in dense}


def keep_count(size: int, density: float) -> int:
    """How many of ``size`` entries a layer at ``density`` keeps."""
    return min(size, max(0, round(density * size)))


def top_positions(score: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` largest scores; ties go to the lower index."""
    order = torch.argsort(score.flatten(), descending=True, stable=True)
    return order[:count]


def uniform_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    return {name: density for name in shapes}


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """ERK layer densities (Evci et al. 2020): ``d_l = eps * sum(dims_l) / prod(dims_l)``,
    capped at 1 with ``eps`` re-solved so that ``sum d_l n_l = density * sum n_l``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density = {density}: must be in (0, 1]")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[name] for name in dense)
        free = [name for name in shapes if name not in dense]
        eps = budget / sum(raw[name] * sizes[name] for name in free) if free else 0.0
        too_dense = {name for name in free if eps * raw[name] > 1.0}
        if not too_dense:
            return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
        dense |= too_dense


class Mask:
    """Boolean masks over named weights, with their densities at any time."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = {name: m.to(torch.bool).clone() for name, m in masks.items()}

    @classmethod
    def dense(cls, params: Mapping[str, torch.Tensor]) -> Mask:
        return cls({name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()})

    @classmethod
    def random(cls, params: Mapping[str, torch.Tensor], densities: Mapping[str, float],
               generator: torch.Generator) -> Mask:
        """Exactly ``round(d_l * n_l)`` positions per layer, uniformly at random."""
        masks = {}
        for name, p in params.items():
            flat = torch.zeros(p.numel(), dtype=torch.bool)
            flat[torch.randperm(p.numel(), generator=generator)[:keep_count(p.numel(),
                                                                           densities[name])]] = True
            masks[name] = flat.view_as(p)
        return cls(masks)

    @classmethod
    def magnitude(cls, params: Mapping[str, torch.Tensor],
                  densities: Mapping[str, float]) -> Mask:
        """The largest-|w| ``round(d_l * n_l)`` positions per layer (one-shot pruning)."""
        masks = {}
        for name, p in params.items():
            flat = torch.zeros(p.numel(), dtype=torch.bool)
            flat[top_positions(p.detach().abs(), keep_count(p.numel(), densities[name]))] = True
            masks[name] = flat.view_as(p)
        return cls(masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __iter__(self):
        return iter(self.masks)

    def items(self):
        return self.masks.items()

    def densities(self) -> dict[str, float]:
        """Fraction of active entries, per layer."""
        return {name: float(m.float().mean()) for name, m in self.masks.items()}

    def active(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def size(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def density(self) -> float:
        """Fraction of active entries over all masked layers."""
        return self.active() / max(1, self.size())

    def copy(self) -> Mask:
        return Mask(self.masks)

    def union(self, other: Mask) -> Mask:
        return Mask({name: m | other.masks[name] for name, m in self.masks.items()})

    def equals(self, other: Mask) -> bool:
        return self.masks.keys() == other.masks.keys() and all(
            torch.equal(m, other.masks[name]) for name, m in self.masks.items())

    @torch.no_grad()
    def apply(self, params: Mapping[str, torch.Tensor]) -> None:
        """Zero, in place, every weight outside the mask."""
        for name, m in self.masks.items():
            params[name].mul_(m)

    @torch.no_grad()
    def apply_to_grads(self, params: Mapping[str, torch.Tensor]) -> None:
        """Zero, in place, every gradient entry outside the mask."""
        for name, m in self.masks.items():
            if params[name].grad is not None:
                params[name].grad.mul_(m)

    def outside_is_zero(self, params: Mapping[str, torch.Tensor]) -> bool:
        """Whether every weight outside the mask is exactly zero."""
        return all(not bool(params[name].detach()[~m].any()) for name, m in self.masks.items())
