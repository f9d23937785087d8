"""Identity: the dense vector, at the configured value precision (float16 halves it, a b-bit
integer code costs b/32 of it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from fedsparse.compress.base import (
    Compressor,
    CompressorSpec,
    Payload,
    decode_values,
    encode_values,
    expect_keys,
    value_keys,
)


class IdentitySpec(CompressorSpec):
    name: Literal["identity"] = "identity"


class Identity(Compressor):
    unbiased = True  # exactly so at float32 and in expectation for intb; float16 rounds

    def compress(self, v: np.ndarray, rng: np.random.Generator) -> Payload:
        return encode_values(v, self.value_dtype, rng)

    def decompress(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        expect_keys(payload, value_keys(self.value_dtype))
        return decode_values(payload, self.value_dtype, d)
