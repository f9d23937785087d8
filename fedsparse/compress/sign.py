"""Scaled sign (biased): ``C(v) = (||v||_1 / d) * sign(v)`` (Karimireddy et al. 2019, EF-SGD).

Sent: the scale (float32) and one bit per coordinate (``np.packbits`` of ``v < 0``), i.e.
``ceil(d/8) + 4`` bytes. A zero coordinate is sent as ``+scale`` (one bit cannot say 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from fedsparse.compress.base import Compressor, CompressorSpec, Payload, expect_array, expect_keys
from fedsparse.payload import PayloadError


class ScaledSignSpec(CompressorSpec):
    name: Literal["sign"] = "sign"
    value_dtype: Literal["float32"] = "float32"  # the scale; signs are bits


class ScaledSign(Compressor):
    unbiased = False

    def compress(self, v: np.ndarray, rng: np.random.Generator) -> Payload:
        scale = float(np.abs(v.astype(np.float64)).sum() / v.size) if v.size else 0.0
        return {"scale": np.array([scale], np.float32), "sign": np.packbits(v < 0)}

    def decompress(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        expect_keys(payload, {"scale", "sign"})
        scale = expect_array(payload, "scale", np.dtype(np.float32), 1)[0]
        if scale < 0:
            raise PayloadError(f"scale: {scale} is negative")
        bits = np.unpackbits(expect_array(payload, "sign", np.dtype(np.uint8), (d + 7) // 8))
        if bits[d:].any():
            raise PayloadError("sign: bits set beyond the vector's length")
        return np.where(bits[:d] == 1, -scale, scale).astype(np.float32)
