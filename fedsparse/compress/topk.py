"""Top-k sparsification (biased, contractive): keep the k largest-magnitude coordinates.

``||C(v) - v||^2 <= (1 - k/d) ||v||^2`` (Stich et al. 2018). ``scope = "global"`` selects
over the whole flattened model (k = ratio * d); ``scope = "per_tensor"`` selects within each
parameter tensor (k_t = ratio * d_t). ``k_count = "round"`` (default) keeps
``round(ratio * d)`` (at least 1); ``"floor"`` keeps ``int(ratio * d)``, as FLASC's release
does for its masks (``train_sparse_lora_dp.py``; 0 when ``ratio * d < 1``). Indices are sent
with the cheapest encoding of :mod:`fedsparse.compress.indices`, values at the configured
precision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from fedsparse.compress import indices
from fedsparse.compress.base import (
    Compressor,
    CompressorSpec,
    Payload,
    count,
    decode_values,
    encode_values,
    expect_keys,
    value_keys,
)
from fedsparse.payload import PayloadError

KCount = Literal["round", "floor"]


class TopKSpec(CompressorSpec):
    name: Literal["topk"] = "topk"
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of coordinates kept")
    scope: Literal["global", "per_tensor"] = "global"
    k_count: KCount = Field("round", description="k from ratio * d: round (at least 1) or "
                                                 "floor (int(ratio * d), FLASC's release)")


def k_of(ratio: float, d: int, rule: KCount) -> int:
    """How many of ``d`` coordinates top-k keeps at ``ratio`` under ``rule``."""
    return count(ratio, d) if rule == "round" else min(d, int(ratio * d))


def top_k(v: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |v_j| (ties: numpy's introselect, deterministic)."""
    if k == 0:
        return np.zeros(0, np.int64)
    if k >= v.size:
        return np.arange(v.size, dtype=np.int64)
    return np.sort(np.argpartition(-np.abs(v), k - 1)[:k]).astype(np.int64)


class TopK(Compressor):
    unbiased = False

    def __init__(self, spec: TopKSpec, segments: Sequence[int] = ()) -> None:
        super().__init__(spec)
        self.ratio = spec.ratio
        self.k_count = spec.k_count
        self.segments = list(segments) if spec.scope == "per_tensor" else []

    def _parts(self, d: int) -> list[tuple[str, int, int]]:
        """(key prefix, start, size) of each selection scope."""
        if not self.segments:
            return [("", 0, d)]
        if sum(self.segments) != d:
            raise PayloadError(f"vector of length {d} does not match the tensors' sizes "
                               f"(sum {sum(self.segments)})")
        starts = np.cumsum([0, *self.segments[:-1]])
        return [(f"t{j}.", int(s), n) for j, (s, n) in enumerate(zip(starts, self.segments,
                                                                    strict=True))]

    def compress(self, v: np.ndarray, rng: np.random.Generator) -> Payload:
        payload: Payload = {}
        for prefix, start, size in self._parts(v.size):
            part = v[start:start + size]
            idx = top_k(part, k_of(self.ratio, size, self.k_count))
            key, data = indices.encode(idx, size)
            payload[prefix + key] = data
            payload.update(encode_values(part[idx], self.value_dtype, rng, prefix))
        return payload

    def decompress(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        out = np.zeros(d, np.float32)
        keys = set()
        for prefix, start, size in self._parts(d):
            scheme, data = indices.find(payload, prefix)
            idx = indices.decode(scheme, data, size)
            k = k_of(self.ratio, size, self.k_count)
            if idx.size != k:
                raise PayloadError(f"{prefix}{indices.KEY}: {idx.size} indices, the configured "
                                   f"ratio {self.ratio} of {size} gives k={k}")
            out[start + idx] = decode_values(payload, self.value_dtype, k, prefix)
            keys |= {f"{prefix}{indices.KEY}.{scheme}"} | value_keys(self.value_dtype, prefix)
        expect_keys(payload, keys)
        return out
