"""The compressor contract: a flat vector in, a payload of named numpy arrays out, and back.

A payload is what crosses the wire, as arrays of an ArrayRecord (no pickle); its size is
:func:`payload_bytes`, the sum of the arrays' ``nbytes``. ``decompress`` validates the
payload it is given (keys, dtypes, shapes, index range and order, finiteness, lengths) and
raises :class:`~fedsparse.payload.PayloadError` with a reason instead of decoding garbage.

Values travel at a configured precision (``value_dtype``): float32, float16 (rounded to
nearest) or a signed b-bit integer ``intb`` (b = 8, 4, 3, 2) with ``L = 2^(b-1) - 1`` levels
on either side of zero (127, 7, 3, 1): ``q_j = floor(v_j / s + u_j)`` with ``u_j ~ U[0, 1)``
and one float32 scale ``s = max_j |v_j| / L`` per value array (at least the smallest float32
step), so ``E[s q_j] = v_j``: stochastic rounding keeps unbiased compressors unbiased (int2 is
TernGrad's ternary code, Wen et al. 2017). int8 values are one int8 each; narrower ones travel
as the codes ``q_j + L`` packed b bits apiece, least significant bit first, into uint8 bytes.
Sparsification followed by such quantisation, with error feedback, is Qsparse-local-SGD
(Basu et al. 2019).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from fedsparse.payload import PayloadError
from fedsparse.schema import SCENARIO_CONFIG

Payload = dict[str, np.ndarray]
ValueDtype = Literal["float32", "float16", "int8", "int4", "int3", "int2"]
INT_BITS: dict[str, int] = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}


def int_levels(bits: int) -> int:
    """``L = 2^(b-1) - 1``: the largest level of a signed b-bit code."""
    return 2 ** (bits - 1) - 1


class CompressorSpec(BaseModel):
    """Parameters of a compressor (a scenario's ``[strategy.compressor]`` section)."""

    model_config = SCENARIO_CONFIG

    name: str
    value_dtype: ValueDtype = "float32"


class Compressor(ABC):
    """C: R^d -> payload -> R^d."""

    unbiased: ClassVar[bool]  # E[C(v)] = v

    def __init__(self, spec: CompressorSpec) -> None:
        self.spec = spec
        self.value_dtype: ValueDtype = spec.value_dtype

    @abstractmethod
    def compress(self, v: np.ndarray, rng: np.random.Generator) -> Payload:
        """Encode the 1-D float32 vector ``v`` (``rng`` drives any randomness)."""

    @abstractmethod
    def decompress(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        """Decode a payload into a float32 d-vector; raise PayloadError if it is malformed."""

    def __call__(self, v: np.ndarray, rng: np.random.Generator) -> tuple[Payload, np.ndarray]:
        """Compress and decode: the payload and exactly what the receiver will reconstruct."""
        payload = self.compress(v, rng)
        return payload, self.decompress(payload, v.size)


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes on the wire: the sum of the payload arrays' ``nbytes``."""
    return int(sum(a.nbytes for a in payload.values()))


def expect_keys(payload: Mapping[str, np.ndarray], keys: set[str]) -> None:
    if set(payload) != keys:
        raise PayloadError(f"payload keys {sorted(payload)}, expected {sorted(keys)}")


def expect_array(payload: Mapping[str, np.ndarray], key: str, dtype: np.dtype,
                 size: int | None = None) -> np.ndarray:
    """``payload[key]`` as a 1-D array of ``dtype`` (and ``size``), finite if floating."""
    if key not in payload:
        raise PayloadError(f"payload lacks {key!r}")
    array = payload[key]
    if array.ndim != 1:
        raise PayloadError(f"{key}: must be 1-D, got shape {array.shape}")
    if array.dtype != dtype:
        raise PayloadError(f"{key}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    if size is not None and array.size != size:
        raise PayloadError(f"{key}: length {array.size}, expected {size}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise PayloadError(f"{key}: contains NaN or Inf")
    return array


def count(ratio: float, d: int) -> int:
    """k = round(ratio * d), at least 1 when ratio > 0 and d > 0."""
    if d == 0 or ratio == 0:
        return 0
    return min(d, max(1, round(ratio * d)))


def stochastic_levels(v: np.ndarray, top_level: int,
                      rng: np.random.Generator) -> tuple[np.float32, np.ndarray]:
    """``s = max|v| / L`` in float32 (the smallest float32 step where that underflows, one step
    up where a subnormal ``s`` rounded down would clip ``max|v|`` by more than a level; 0 for
    v = 0), and ``q = floor(v / s + u)`` clipped to ``[-L, L]``, as int64."""
    top = float(np.abs(v).max(initial=0.0))
    if top == 0:
        return np.float32(0), np.zeros(v.size, np.int64)
    scale = max(np.float32(top / top_level), np.finfo(np.float32).smallest_subnormal)
    if float(scale) * (top_level + 1) < top:  # a subnormal scale rounded down so far that
        scale = np.nextafter(scale, np.float32(np.inf))  # max|v| would clip more than a level
    levels = np.floor(v.astype(np.float64) / float(scale) + rng.random(v.size))
    return scale, np.clip(levels, -top_level, top_level).astype(np.int64)


def encode_values(v: np.ndarray, dtype: ValueDtype, rng: np.random.Generator,
                  prefix: str = "") -> Payload:
    """``v`` at the wire precision ``dtype``: ``{prefix}val`` (and ``{prefix}scale`` for intb)."""
    if dtype not in INT_BITS:
        return {prefix + "val": v.astype(dtype)}
    bits = INT_BITS[dtype]
    top_level = int_levels(bits)
    scale, levels = stochastic_levels(v, top_level, rng)
    if bits == 8:
        values = levels.astype(np.int8)
    else:
        codes = (levels + top_level).astype(np.uint8)
        values = np.packbits((codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1,
                             axis=None, bitorder="little")
    return {prefix + "val": values, prefix + "scale": np.array([scale], np.float32)}


def value_keys(dtype: ValueDtype, prefix: str = "") -> set[str]:
    """The payload keys :func:`encode_values` writes."""
    return {prefix + "val", prefix + "scale"} if dtype in INT_BITS else {prefix + "val"}


def decode_values(payload: Mapping[str, np.ndarray], dtype: ValueDtype, size: int,
                  prefix: str = "") -> np.ndarray:
    """The float32 values :func:`encode_values` sent; raises PayloadError if malformed."""
    if dtype not in INT_BITS:
        return expect_array(payload, prefix + "val", np.dtype(dtype), size).astype(np.float32)
    bits = INT_BITS[dtype]
    top_level = int_levels(bits)
    scale = expect_array(payload, prefix + "scale", np.dtype(np.float32), 1)[0]
    if not 0 <= scale <= np.finfo(np.float32).max / top_level:
        raise PayloadError(f"{prefix}scale: {scale} is negative or overflows float32 "
                           f"at level {top_level}")
    if bits == 8:
        levels = expect_array(payload, prefix + "val", np.dtype(np.int8), size).astype(np.int64)
    else:
        packed = expect_array(payload, prefix + "val", np.dtype(np.uint8),
                              (size * bits + 7) // 8)
        unpacked = np.unpackbits(packed, bitorder="little")
        if unpacked[size * bits:].any():
            raise PayloadError(f"{prefix}val: padding bits after {size} {dtype} codes are set")
        codes = unpacked[:size * bits].reshape(size, bits).astype(np.int64) @ (
            1 << np.arange(bits, dtype=np.int64))
        levels = codes - top_level
    beyond = levels[np.abs(levels) > top_level]
    if beyond.size:
        raise PayloadError(f"{prefix}val: level {beyond[0]} beyond +-{top_level} for {dtype}")
    return levels.astype(np.float32) * scale
