"""SoRA: sparse low-rank adaptation with rank gates (Ding et al., EMNLP 2023; ALGORITHMS.md
§3.2), and how a federation shares it.

Training (the release's two knobs): the loss adds ``eta * mean |g|`` over all gate entries;
the gates have their own optimiser (AdamW without weight decay), and after each of its steps
every gate entry is thresholded with ``xi`` itself (not ``lr * xi``). ``xi`` may follow a
linear sparsifying schedule over the rounds. Two threshold rules (:func:`threshold`):

- ``"paper"`` (default): the soft threshold ``T_xi(g) = sign(g) * max(|g| - xi, 0)``, the
  proximal step of the L1 term (the paper's gate update);
- ``"release"``: the release's three in-place lines after the AdamW step
  (``src/sparse_optimizer.py``: ``g[g > xi] -= xi; g[g < -xi] += xi; g[|g| < xi] = 0``),
  which run one after the other, so an entry in ``(xi, 2 xi)`` is shrunk into ``(0, xi)``
  and then zeroed: every ``|g| < 2 xi`` becomes 0, the others shrink by ``xi``.

Federation (ALGORITHMS.md §3.2 option (a), a design not from either paper): the server sets
the global gates to the same threshold step of ``mean_i g_i``; a rank whose global gate is
zero is pruned for the rest of the run: its row of ``A``, column of ``B`` and gate are zero,
no longer trained and no longer sent in either direction (:class:`RankLayout` says which
coordinates are alive).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from fedsparse.lora.model import ADAPTER, LoRAClassifier, _key

ThresholdRule = Literal["paper", "release"]
THRESHOLD_RULES: tuple[ThresholdRule, ...] = ("paper", "release")


def soft_threshold(g: torch.Tensor, xi: float) -> torch.Tensor:
    """``T_xi(g) = sign(g) * max(|g| - xi, 0)``: entries with ``|g| <= xi`` become exactly 0."""
    return torch.sign(g) * torch.clamp(g.abs() - xi, min=0.0)


def release_threshold(g: torch.Tensor, xi: float) -> torch.Tensor:
    """SoRA's released threshold step: its three in-place lines, in their order, on a copy."""
    out = g.clone()
    out[out > xi] -= xi
    out[out < -xi] += xi
    out[out.abs() < xi] = 0.0
    return out


def threshold(g: torch.Tensor, xi: float, rule: ThresholdRule) -> torch.Tensor:
    """The gates after the threshold step of ``rule`` (see the module's docstring)."""
    if rule == "paper":
        return soft_threshold(g, xi)
    if rule == "release":
        return release_threshold(g, xi)
    raise ValueError(f"SoRA threshold rule {rule!r}; allowed: {', '.join(THRESHOLD_RULES)}")


def l1_penalty(gates: list[torch.Tensor], eta: float) -> torch.Tensor:
    """``eta * mean |g|`` over every gate entry (the release normalises by the count)."""
    flat = torch.cat([g.reshape(-1) for g in gates])
    return eta * flat.abs().mean()


def linear_schedule(initial: float, final: float, server_round: int, rounds: int) -> float:
    """``initial`` at round 1 to ``final`` at round ``rounds``, linearly."""
    if rounds <= 1:
        return final
    return initial + (final - initial) * (server_round - 1) / (rounds - 1)


class RankLayout:
    """Which ranks of which adapted modules are alive, and the coordinates they own in the
    flat adapter vector (every shared tensor but the gates, in the shared state's order)."""

    def __init__(self, model: LoRAClassifier) -> None:
        self.rank = model.params.rank
        self.modules = list(model.lora_layers())
        self.sora = model.params.sora
        prefix = "peft.base_model.model."
        self.a_name = {m: f"{prefix}{m}.lora_A.{ADAPTER}.weight" for m in self.modules}
        self.b_name = {m: f"{prefix}{m}.lora_B.{ADAPTER}.weight" for m in self.modules}
        self.gate_name = {m: f"gates.{_key(m)}" for m in self.modules}
        shared = model.federated_state_dict()
        gates = set(self.gate_name.values())
        self.shapes = {n: tuple(t.shape) for n, t in shared.items() if n not in gates}
        self.alive = {m: np.ones(self.rank, bool) for m in self.modules}

    @property
    def size(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes.values()))

    def coordinates(self) -> np.ndarray:
        """Boolean over the flat adapter vector: the coordinates of alive ranks (and all of
        the head's)."""
        parts = []
        for name, shape in self.shapes.items():
            keep = np.ones(shape, bool)
            for m in self.modules:
                if name == self.a_name[m]:
                    keep[~self.alive[m], :] = False
                elif name == self.b_name[m]:
                    keep[:, ~self.alive[m]] = False
            parts.append(keep.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, bool)

    def alive_gates(self) -> np.ndarray:
        """Boolean over the concatenated gates of all modules."""
        return np.concatenate([self.alive[m] for m in self.modules])

    def ranks_alive(self) -> int:
        return int(sum(a.sum() for a in self.alive.values()))

    def bitmap(self) -> np.ndarray:
        """The alive ranks of every module, packed (what the server tells the clients)."""
        return np.packbits(self.alive_gates())

    def load_bitmap(self, bits: np.ndarray) -> None:
        flags = np.unpackbits(bits.astype(np.uint8))[:self.rank * len(self.modules)].astype(bool)
        for i, m in enumerate(self.modules):
            self.alive[m] = flags[i * self.rank:(i + 1) * self.rank].copy()

    def split(self, shared: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(flat adapter vector, concatenated gates)`` of a shared state."""
        adapter = np.concatenate([np.asarray(shared[n]).reshape(-1) for n in self.shapes]) \
            if self.shapes else np.zeros(0, np.float32)
        gates = np.concatenate([np.asarray(shared[self.gate_name[m]]) for m in self.modules]) \
            if self.sora else np.zeros(0, np.float32)
        return adapter.astype(np.float32), gates.astype(np.float32)

    def join(self, adapter: np.ndarray, gates: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of :meth:`split`: the shared state, in the model's order."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = adapter[start:start + size].reshape(shape).astype(np.float32)
            start += size
        if self.sora:
            for i, m in enumerate(self.modules):
                out[self.gate_name[m]] = gates[i * self.rank:(i + 1) * self.rank].astype(
                    np.float32)
        return out
