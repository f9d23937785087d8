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
    """C-contiguous copies where needed; 0-d arrays (e.g. BatchNorm's counter) stay 0-d."""
    return ArrayRecord({key: Array(np.require(value, requirements="C"))
                        for key, value in arrays.items()})


def cast_like(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """An aggregate back in a model's dtype; integer arrays (e.g. BatchNorm's batch counter)
    are rounded, not truncated."""
    return (np.rint(value) if np.dtype(dtype).kind in "iu" else value).astype(dtype)


def array_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays in ``record``: sum over arrays of size * itemsize."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of every ArrayRecord in a message's content."""
    return sum(array_bytes(record) for record in content.array_records.values())

