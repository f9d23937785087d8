"""Training FLOPs of a step on a sparse model, beside the dense-equivalent count.

The dense per-example counts come from ``torch.utils.flop_counter.FlopCounterMode`` (one
example through forward and backward of a CPU copy of the model, counted per module, so
the same counts on every device: ``flops.py``); sparsity then scales each
masked layer's three matrix products (SparCL, Wang et al. 2022, Section 4's FLOPs
accounting; ALGORITHMS.md §4.6):

- forward ``F_l`` and input-gradient ``G_l``: only active weights take part -> ``* d_w``;
- weight gradient (``F_l`` again): only gradient entries that are not masked are computed
  -> ``* d_g`` (the weight density without gradient masking).

Unmasked layers count dense. Per step the counts are multiplied by the examples that went
through forward and backward, so removed examples are not counted. These are the FLOPs a
sparse kernel would execute; PyTorch's dense CPU kernels run the dense count (see
``benchmarks/RESULTS.md`` for wall time).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class LayerFlops:
    forward: int  # F_l, per example
    input_grad: int  # G_l, per example (0 for a first layer whose input needs no gradient)


class SparseFlops:
    """Per-example training FLOPs of ``model`` given the densities of its masked layers."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...],
                 masked: list[str]) -> None:
        self.input_shape = input_shape
        probe = copy.deepcopy(model).cpu()
        x = torch.zeros((1, *input_shape))
        root = type(probe).__name__
        with FlopCounterMode(display=False) as forward:
            out = probe(x)
        with FlopCounterMode(display=False) as full:
            probe(x).sum().backward()
        self.dense = int(full.get_total_flops())
        fwd, both = forward.get_flop_counts(), full.get_flop_counts()
        self.layers: dict[str, LayerFlops] = {}
        for name in masked:
            key = f"{root}.{name.removesuffix('.weight')}"
            f = int(sum(fwd.get(key, {}).values()))
            backward = int(sum(both.get(key, {}).values())) - f
            self.layers[name] = LayerFlops(forward=f, input_grad=max(0, backward - f))
        del out

    def per_example(self, weight_density: Mapping[str, float],
                    grad_density: Mapping[str, float]) -> int:
        """Training FLOPs of one example at these densities (dense: ``self.dense``)."""
        saved = 0.0
        for name, layer in self.layers.items():
            d_w, d_g = weight_density[name], grad_density[name]
            saved += (layer.forward + layer.input_grad) * (1.0 - d_w) + layer.forward * (1.0 - d_g)
        return round(self.dense - saved)
