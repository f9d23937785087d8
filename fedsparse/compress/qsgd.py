"""QSGD with s levels (Alistarh et al. 2017), unbiased stochastic quantisation.

``C(v)_j = ||v||_2 * sign(v_j) * l_j / s`` with ``l_j = floor(r_j) + Bernoulli(r_j -
floor(r_j))``, ``r_j = s |v_j| / ||v||_2``, so ``E[C(v)] = v`` and ``omega <= min(d/s^2,
sqrt(d)/s)``. Sent: the norm (float32) and the signed levels (int8 for s <= 127, else int16),
either dense or, when fewer bytes, only the non-zero levels with their indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field

from fedsparse.compress import indices
from fedsparse.compress.base import Compressor, CompressorSpec, Payload, expect_array, expect_keys
from fedsparse.payload import PayloadError


class QSGDSpec(CompressorSpec):
    name: Literal["qsgd"] = "qsgd"
    levels: int = Field(4, ge=1, le=32767, description="s, the number of levels")
    value_dtype: Literal["float32"] = "float32"  # the norm; levels are integers


class QSGD(Compressor):
    unbiased = True

    def __init__(self, spec: QSGDSpec) -> None:
        super().__init__(spec)
        self.s = spec.levels
        self.level_dtype = np.dtype(np.int8 if self.s <= 127 else np.int16)

    def compress(self, v: np.ndarray, rng: np.random.Generator) -> Payload:
        norm = float(np.linalg.norm(v.astype(np.float64)))
        if norm == 0.0:
            levels = np.zeros(v.size, self.level_dtype)
        else:
            r = self.s * np.abs(v.astype(np.float64)) / norm
            low = np.floor(r)
            levels = (low + (rng.random(v.size) < r - low)) * np.sign(v)
            levels = levels.astype(self.level_dtype)
        dense: Payload = {"norm": np.array([norm], np.float32), "lvl": levels}
        nonzero = np.flatnonzero(levels)
        key, data = indices.encode(nonzero, v.size)
        sparse: Payload = {"norm": dense["norm"], key: data, "lvl": levels[nonzero]}
        return sparse if sum(a.nbytes for a in sparse.values()) < levels.nbytes + 4 else dense

    def decompress(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        norm = expect_array(payload, "norm", np.dtype(np.float32), 1)[0]
        if norm < 0:
            raise PayloadError(f"norm: {norm} is negative")
        if any(k.startswith(f"{indices.KEY}.") for k in payload):
            scheme, data = indices.find(payload)
            idx = indices.decode(scheme, data, d)
            levels = expect_array(payload, "lvl", self.level_dtype, idx.size)
            expect_keys(payload, {"norm", f"{indices.KEY}.{scheme}", "lvl"})
        else:
            idx = np.arange(d)
            levels = expect_array(payload, "lvl", self.level_dtype, d)
            expect_keys(payload, {"norm", "lvl"})
        if levels.size and np.abs(levels.astype(np.int64)).max() > self.s:
            raise PayloadError(f"lvl: level beyond +-{self.s}")
        out = np.zeros(d, np.float32)
        out[idx] = norm * levels.astype(np.float32) / np.float32(self.s)
        return out
