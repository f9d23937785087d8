"""FLASC: federated LoRA with sparse communication (Kuo, Raje, Rajesh, Smith 2024,
arXiv 2406.05233; ALGORITHMS.md §3.1), the concrete form of CELLM's "LoRA + sparse updates"
(Vavekanand & Sam 2024, whose own listing could not be retrieved).

The server holds the dense trainable vector ``P`` (adapters + head, all tensors flattened
jointly) and a server optimiser. In round ``t``:

1. densities ``d_t = d_0 * decay^((t - 1) // every)`` for the download and the upload;
2. download mask ``M``: the ``d_down * |P|`` largest ``|P|`` over all tensors jointly; the
   clients receive ``P * M`` (zeros outside ``M``, not the server's values). How many that
   is: ``round(d * n)`` by default, ``int(d * n)`` as in FLASC's release (``topk_count``);
3. a client trains every adapter entry densely from ``P * M`` and uploads the top
   ``d_up * |D|`` entries of ``D = P * M - P_i`` (global top-k, no memory; with
   ``error_feedback`` a residual ``e_i`` is added to ``D`` first and keeps what was not sent,
   the CELLM-style variant); values travel at ``value_dtype`` (``up_value_dtype`` for the
   upload): float32 as in FLASC, or float16 or b-bit integers (our addition, the codec of
   #3; with error feedback this is Qsparse-local-SGD's top-k then quantise);
4. ``G = mean_i D_i`` over the clients that replied is a pseudo-gradient: one step of the
   server optimiser (Adam/AdamW as FedAdam; ``sgd`` at ``server_lr = 1`` is plain averaging
   of the clients' adapters when ``d_down = 1``; below it, entries outside the download mask
   become ``P + mean update``).

A density of 1 sends the dense float32 vector (the identity compressor), so dense federated
LoRA is FLASC at ``d_down = d_up = 1``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from fedsparse.compress import Compressor, build_compressor
from fedsparse.compress.base import ValueDtype
from fedsparse.compress.identity import IdentitySpec
from fedsparse.compress.topk import KCount, TopKSpec

ServerOptimizerName = Literal["adam", "adamw", "sgd"]
# how many entries a mask at density d keeps of n: fedsparse round(d * n), the release int(d * n)
K_COUNT: dict[str, KCount] = {"fedsparse": "round", "release": "floor"}


def scheduled_density(initial: float, decay: float, every: int, server_round: int) -> float:
    """``d_0 * decay^((t - 1) // every)``."""
    return initial * decay ** ((server_round - 1) // every)


def sparsifier(density: float, value_dtype: ValueDtype = "float32",
               topk_count: str = "fedsparse") -> Compressor:
    """Global top-k at ``density`` (FLASC's masks; ``topk_count``: see :data:`K_COUNT`), or
    the dense vector at density 1."""
    if topk_count not in K_COUNT:
        raise ValueError(f"topk_count = {topk_count!r}; allowed: {', '.join(K_COUNT)}")
    if density >= 1.0:
        return build_compressor(IdentitySpec(value_dtype=value_dtype), [])
    return build_compressor(TopKSpec(ratio=density, scope="global", value_dtype=value_dtype,
                                     k_count=K_COUNT[topk_count]), [])


class ServerOptimizer:
    """A torch optimiser stepping the flat vector ``P`` with a pseudo-gradient."""

    def __init__(self, name: ServerOptimizerName, lr: float, size: int) -> None:
        self.param = torch.nn.Parameter(torch.zeros(size))
        self.optimizer: torch.optim.Optimizer = {
            "adam": lambda: torch.optim.Adam([self.param], lr=lr),
            "adamw": lambda: torch.optim.AdamW([self.param], lr=lr),
            "sgd": lambda: torch.optim.SGD([self.param], lr=lr),
        }[name]()

    def step(self, p: np.ndarray, pseudo_gradient: np.ndarray) -> np.ndarray:
        """``P`` after one optimiser step with gradient ``G``."""
        with torch.no_grad():
            self.param.copy_(torch.from_numpy(p))
        self.param.grad = torch.from_numpy(pseudo_gradient.astype(np.float32))
        self.optimizer.step()
        return self.param.detach().numpy().copy()

    def state_arrays(self) -> dict[str, np.ndarray]:
        state = self.optimizer.state.get(self.param, {})
        return {k: torch.as_tensor(v).numpy().copy() for k, v in state.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            self.optimizer.state[self.param] = {k: torch.from_numpy(v.copy())
                                                for k, v in arrays.items()}
