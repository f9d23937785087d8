"""Named arrays (a model's state) <-> one flat float32 vector, in the arrays' order."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float32 vector of all arrays in order."""
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
