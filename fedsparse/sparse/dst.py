"""Dynamic sparse training: drop the weakest active weights, regrow as many elsewhere.

Yildirim et al., CPAL 2024 (ALGORITHMS.md §5.2 step d; their ``core.py`` ``Masking``):
every update, in each masked layer, drop the ``rate * nnz`` active weights of smallest
magnitude and regrow the same number among the inactive positions by a criterion:

- ``random``: uniformly at random (SET, Mocanu et al. 2018);
- ``gradient``: largest |gradient| (RigL, Evci et al. 2020);
- ``momentum``: largest |optimiser momentum| (SNFS, Dettmers & Zettlemoyer 2019).

Regrown weights start at zero. The drop rate follows a cosine decay from ``initial`` to
``final`` over the training it spans. Positions frozen by per-task isolation
(``isolation.py``) may be dropped from the current mask but never change value, and are
never regrown (the reference regrows them as zero-valued frozen weights: budget spent on
weights that cannot train).
Ties in any ranking go to the lower flat index, so a seed fixes every mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from fedsparse.sparse.masks import Mask, top_positions

Growth = Literal["random", "gradient", "momentum"]


def cosine_rate(progress: float, initial: float = 0.5, final: float = 0.005) -> float:
    """Drop rate at ``progress`` in [0, 1] of the schedule (cosine annealing)."""
    progress = min(1.0, max(0.0, progress))
    return final + (initial - final) * (1.0 + math.cos(math.pi * progress)) / 2.0


def grow(mask: torch.Tensor, count: int, growth: Growth, generator: torch.Generator,
         signal: torch.Tensor | None = None, blocked: torch.Tensor | None = None
         ) -> torch.Tensor:
    """``mask`` with ``count`` more active positions chosen among its inactive ones that are
    not ``blocked``."""
    flat = mask.flatten().clone()
    candidates = ~flat if blocked is None else ~flat & ~blocked.flatten()
    inactive = torch.nonzero(candidates).flatten()
    count = min(count, len(inactive))
    if growth == "random":
        chosen = inactive[torch.randperm(len(inactive), generator=generator)[:count]]
    else:
        if signal is None:
            raise ValueError(f"growth {growth!r} needs a {growth} signal for every masked layer")
        chosen = inactive[top_positions(signal.flatten()[inactive].abs(), count)]
    flat[chosen] = True
    return flat.view_as(mask)


def keep_top(mask: torch.Tensor, score: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` active positions of ``mask`` with the largest ``score``."""
    flat = mask.flatten()
    active = torch.nonzero(flat).flatten()
    kept = torch.zeros_like(flat)
    kept[active[top_positions(score.flatten()[active], min(count, len(active)))]] = True
    return kept.view_as(mask)


@torch.no_grad()
def drop_and_grow(mask: Mask, params: Mapping[str, torch.Tensor], rate: float, growth: Growth,
                  generator: torch.Generator,
                  signals: Mapping[str, torch.Tensor] | None = None,
                  frozen: Mapping[str, torch.Tensor] | None = None) -> Mask:
    """One DST update of every layer at constant density; weights are updated in place
    (dropped ones zeroed, regrown ones start at zero). ``frozen`` positions are never
    regrown: a frozen weight cannot train from zero (fewer are regrown if too few remain)."""
    updated = {}
    for name, m in mask.items():
        weight = params[name]
        active = int(m.sum())
        dropped = round(rate * active)
        kept = keep_top(m, weight.abs(), active - dropped)
        new = grow(kept, dropped, growth, generator,
                   None if signals is None else signals.get(name),
                   None if frozen is None else frozen.get(name))
        weight.mul_(kept)
        updated[name] = new
    return Mask(updated)
