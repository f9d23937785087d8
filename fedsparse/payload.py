"""Validation of what clients send: every payload is checked on receipt.

A malformed payload raises :class:`PayloadError` with a reason naming the offending array
or field; the server rejects that client's update for the round and goes on.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class PayloadError(ValueError):
    """A client payload is malformed; ``str(err)`` says what and where."""


def check_dense(received: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """``received`` must hold exactly ``reference``'s arrays: same keys, shapes, dtypes, finite."""
    missing = [k for k in reference if k not in received]
    extra = [k for k in received if k not in reference]
    if missing or extra:
        raise PayloadError(f"array keys differ from the model's: missing {missing}, extra {extra}")
    for key, ref in reference.items():
        got = received[key]
        if got.shape != ref.shape:
            raise PayloadError(f"{key}: shape {got.shape}, expected {ref.shape}")
        if got.dtype != ref.dtype:
            raise PayloadError(f"{key}: dtype {got.dtype}, expected {ref.dtype}")
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise PayloadError(f"{key}: contains NaN or Inf")


def check_count(value: object, name: str) -> int:
    """A strictly positive integer count (e.g. ``num-examples``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise PayloadError(f"{name} = {value!r}: expected a positive integer")
    if value <= 0:
        raise PayloadError(f"{name} = {value!r}: expected a positive integer")
    return int(value)
