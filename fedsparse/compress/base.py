"""The compressor contract: a flat vector in, a payload of named numpy arrays out, and back.

A payload is what crosses the wire, as arrays of an ArrayRecord (no pickle); its size is
:func:`payload_bytes`, the sum of the arrays' ``nbytes``. ``decompress`` validates the
payload it is given (keys, dtypes, shapes, index range and order, finiteness, lengths) and
raises :class:`~fedsparse.payload.PayloadError` with a reason instead of decoding garbage.

Values travel at a configured precision (``value_dtype``): float32, float16 (rounded to
nearest) or int8: ``q_j = floor(v_j / s + u_j)`` with ``u_j ~ U[0, 1)`` and one float32 scale
``s = max_j |v_j| / 127`` per value array (at least the smallest float32 step), so
``E[s q_j] = v_j`` (stochastic rounding keeps unbiased compressors unbiased) and every value
costs one byte.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from fedsparse.payload import PayloadError

Payload = dict[str, np.ndarray]
ValueDtype = Literal["float32", "float16", "int8"]
INT8_LEVELS = 127


class CompressorSpec(BaseModel):
    """Parameters of a compressor (a scenario's ``[strategy.compressor]`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    value_dtype: ValueDtype = "float32"


class Compressor(ABC):
    """C: R^d -> payload -> R^d."""

    unbiased: ClassVar[bool]  # E[C(v)] = v

    def __init__(self, spec: CompressorSpec) -> None:
        self.spec = spec
        self.value_dtype = np.dtype(spec.value_dtype)

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


def encode_values(v: np.ndarray, dtype: np.dtype, rng: np.random.Generator,
                  prefix: str = "") -> Payload:
    """``v`` at the wire precision ``dtype``: ``{prefix}val`` (and ``{prefix}scale`` for int8)."""
    if dtype != np.int8:
        return {prefix + "val": v.astype(dtype)}
    top = float(np.abs(v).max(initial=0.0))
    if top == 0:
        return {prefix + "val": np.zeros(v.size, np.int8),
                prefix + "scale": np.zeros(1, np.float32)}
    # where top / 127 underflows float32, the smallest step instead
    scale = max(np.float32(top / INT8_LEVELS), np.finfo(np.float32).smallest_subnormal)
    levels = np.floor(v.astype(np.float64) / float(scale) + rng.random(v.size))
    levels = np.clip(levels, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return {prefix + "val": levels, prefix + "scale": np.array([scale], np.float32)}


def value_keys(dtype: np.dtype, prefix: str = "") -> set[str]:
    """The payload keys :func:`encode_values` writes."""
    return {prefix + "val", prefix + "scale"} if dtype == np.int8 else {prefix + "val"}


def decode_values(payload: Mapping[str, np.ndarray], dtype: np.dtype, size: int,
                  prefix: str = "") -> np.ndarray:
    """The float32 values :func:`encode_values` sent; raises PayloadError if malformed."""
    values = expect_array(payload, prefix + "val", dtype, size)
    if dtype != np.int8:
        return values.astype(np.float32)
    scale = expect_array(payload, prefix + "scale", np.dtype(np.float32), 1)[0]
    if not 0 <= scale <= np.finfo(np.float32).max / INT8_LEVELS:
        raise PayloadError(f"{prefix}scale: {scale} is negative or overflows float32 "
                           f"at level {INT8_LEVELS}")
    if values.size and values.min() < -INT8_LEVELS:
        raise PayloadError(f"{prefix}val: level {values.min()} beyond +-{INT8_LEVELS}")
    return values.astype(np.float32) * scale
