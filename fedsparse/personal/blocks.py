"""pFedGate's block partition of a model (Chen et al., ICML 2023, Section 4.1; ALGORITHMS.md
§2.2): every parameter tensor, flattened, is cut into ``B`` contiguous chunks.

A tensor of ``n`` elements is cut into ``ceil(n / c)`` chunks of ``c = ceil(n / min(B, n))``
elements, the last one taking the remainder (so a tensor with fewer than ``B`` elements has
one block per element). Blocks are numbered in the order of ``model.named_parameters()`` and
tagged with their *group*: ``"linear"`` for the parameters of ``nn.Linear`` modules,
``"other"`` for the rest (convolutions, normalisation, ...); the knapsack selects within each
group separately, since linear layers are far larger than the others. The first chunk of
every tensor (``sub0``) is always kept, so that no tensor is cut off entirely.

:meth:`BlockPartition.expand` turns one value per block into per-tensor multipliers of the
tensors' shapes: the mask (and scale) a gated forward pass applies to the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Group = Literal["linear", "other"]


@dataclass(frozen=True)
class Block:
    tensor: str  # parameter name, e.g. "3.weight"
    start: int  # first flat element of the tensor in this block
    size: int
    group: Group
    first: bool  # sub0: always kept


class BlockPartition:
    """The blocks of a model's parameters; ``sizes`` and ``groups`` indexed by block."""

    def __init__(self, model: nn.Module, blocks_per_tensor: int) -> None:
        if blocks_per_tensor < 1:
            raise ValueError(f"blocks_per_tensor = {blocks_per_tensor}: must be >= 1")
        self.blocks_per_tensor = blocks_per_tensor
        linear = {f"{name}.{p}" if name else p for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) for p, _ in module.named_parameters(
                      recurse=False)}
        self.shapes: dict[str, torch.Size] = {}
        self.blocks: list[Block] = []
        for name, param in model.named_parameters():
            self.shapes[name] = param.shape
            n = param.numel()
            chunk = math.ceil(n / min(blocks_per_tensor, n))
            group: Group = "linear" if name in linear else "other"
            for j, start in enumerate(range(0, n, chunk)):
                self.blocks.append(Block(name, start, min(chunk, n - start), group, j == 0))
        self.sizes = torch.tensor([b.size for b in self.blocks], dtype=torch.int64)
        self.first = torch.tensor([b.first for b in self.blocks])
        self._ranges: dict[str, tuple[int, int]] = {}  # tensor -> its blocks [lo, hi)
        for i, block in enumerate(self.blocks):
            lo, _ = self._ranges.get(block.tensor, (i, i))
            self._ranges[block.tensor] = (lo, i + 1)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def total(self) -> int:
        """Number of parameters covered (all of the model's parameters)."""
        return int(self.sizes.sum())

    def group(self, group: Group) -> torch.Tensor:
        """Boolean over blocks: those of ``group``."""
        return torch.tensor([b.group == group for b in self.blocks])

    def expand(self, per_block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-tensor multipliers: each element gets the value of its block (differentiable)."""
        out = {}
        for name, (lo, hi) in self._ranges.items():
            flat = torch.repeat_interleave(per_block[lo:hi],
                                           self.sizes[lo:hi].to(per_block.device))
            out[name] = flat.view(self.shapes[name])
        return out

    def kept_fraction(self, keep: torch.Tensor) -> float:
        """Share of all parameters in the kept blocks (sub0 included): the true density."""
        return float(self.sizes[keep].sum()) / self.total

    def tensor_densities(self, keep: torch.Tensor) -> dict[str, float]:
        """Per parameter tensor: the share of its elements in kept blocks."""
        kept = self.sizes * keep
        return {name: float(kept[lo:hi].sum()) / float(self.sizes[lo:hi].sum())
                for name, (lo, hi) in self._ranges.items()}

    def flatten(self, params: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """The values of the kept blocks, concatenated in block order."""
        parts = [params[b.tensor].detach().reshape(-1)[b.start:b.start + b.size]
                 for b, k in zip(self.blocks, keep.tolist(), strict=True) if k]
        return torch.cat(parts) if parts else torch.zeros(0)

    def scatter(self, values: torch.Tensor, keep: torch.Tensor,
                into: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`flatten`: write ``values`` into the kept blocks of ``into``."""
        offset = 0
        for block, k in zip(self.blocks, keep.tolist(), strict=True):
            if k:
                flat = into[block.tensor].view(-1)
                flat[block.start:block.start + block.size] = values[offset:offset + block.size]
                offset += block.size
