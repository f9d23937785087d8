"""Identity: the dense vector, at the configured value precision (float16 halves it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from fedsparse.compress.base import Compressor, CompressorSpec, Payload, expect_array, expect_keys


class IdentitySpec(CompressorSpec):
    name: Literal["identity"] = "identity"


class Identity(Compressor):
    unbiased = True  # exactly so at float32; float16 rounds to nearest

    def compress(self, v: np.ndarray, rng: np.random.Generator) -> Payload:
        return {"val": v.astype(self.value_dtype)}

    def decompress(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        expect_keys(payload, {"val"})
        return expect_array(payload, "val", self.value_dtype, d).astype(np.float32)
