"""Translation between Flower records and numpy, and the byte count of what crosses the wire."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Decode every array of ``record`` (``np.load`` without pickle) by name."""
    return {key: array.numpy() for key, array in record.items()}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def array_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays in ``record``: sum over arrays of size * itemsize."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of every ArrayRecord in a message's content."""
    return sum(array_bytes(record) for record in content.array_records.values())


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float32 vector of all arrays in order (the model's parameter vector)."""
    if not arrays:
        return np.zeros(0, np.float32)
    return np.concatenate([a.reshape(-1) for a in arrays.values()]).astype(np.float32)


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split ``vector`` back into arrays shaped and typed like ``like``."""
    out, start = {}, 0
    for key, ref in like.items():
        out[key] = vector[start:start + ref.size].reshape(ref.shape).astype(ref.dtype)
        start += ref.size
    if start != vector.size:
        raise ValueError(f"vector of length {vector.size} does not fit arrays of {start} values")
    return out
