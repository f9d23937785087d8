"""Rand-k sparsification (unbiased): k uniformly random coordinates, scaled by d/k.

``E[C(v)] = v`` and ``E||C(v) - v||^2 = (d/k - 1) ||v||^2`` (omega = d/k - 1). The receiver
regenerates the coordinates from a 64-bit seed, so the payload is the seed (8 bytes) and the
k values: no indices are sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field

from fedsparse.compress.base import (
    Compressor,
    CompressorSpec,
    Payload,
    count,
    decode_values,
    encode_values,
    expect_array,
    expect_keys,
    value_keys,
)


class RandKSpec(CompressorSpec):
    name: Literal["randk"] = "randk"
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of coordinates sent")


def coordinates(seed: int, d: int, k: int) -> np.ndarray:
    """The k coordinates a seed selects (sorted): the same on every machine."""
    return np.sort(np.random.Generator(np.random.PCG64(seed)).choice(d, size=k, replace=False))


class RandK(Compressor):
    unbiased = True

    def __init__(self, spec: RandKSpec) -> None:
        super().__init__(spec)
        self.ratio = spec.ratio

    def compress(self, v: np.ndarray, rng: np.random.Generator) -> Payload:
        seed = int(rng.integers(0, 2**63))
        idx = coordinates(seed, v.size, count(self.ratio, v.size))
        return {"seed": np.array([seed], np.uint64), **encode_values(v[idx], self.value_dtype, rng)}

    def decompress(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        expect_keys(payload, {"seed"} | value_keys(self.value_dtype))
        k = count(self.ratio, d)
        seed = int(expect_array(payload, "seed", np.dtype(np.uint64), 1)[0])
        values = decode_values(payload, self.value_dtype, k)
        out = np.zeros(d, np.float32)
        if k:
            out[coordinates(seed, d, k)] = values * np.float32(d / k)
        return out
