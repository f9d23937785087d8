"""Validation of what clients send: every payload is checked on receipt.

A malformed payload raises :class:`PayloadError` with a reason naming the offending array
or field; the server rejects that client's update for the round and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

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


def check_count(value: object, name: str, bound: float = math.inf) -> int:
    """A strictly positive integer count (e.g. ``num-examples``), at most ``bound``."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value != int(value) or value <= 0:
        raise PayloadError(f"{name} = {value!r}: expected a positive integer")
    if value > bound:
        raise PayloadError(f"{name} = {value!r}: more than the {bound} this client can have")
    return int(value)


@dataclass(frozen=True)
class MetricSpec:
    """What one reply metric may be: a finite number in ``[low, high]`` (an integer if
    ``integer``)."""

    low: float = 0.0
    high: float = 2.0 ** 63
    integer: bool = False


def check_metrics(metrics: Mapping[str, object], specs: Mapping[str, MetricSpec]
                  ) -> dict[str, int | float]:
    """``metrics`` as plain numbers, each a key of ``specs`` within its range; PayloadError
    naming the first key that is unknown, not a number (a list), not finite or out of range."""
    checked: dict[str, int | float] = {}
    for key, value in metrics.items():
        spec = specs.get(key)
        if spec is None:
            raise PayloadError(f"metric {key!r} is not one a client reports; allowed: "
                               f"{', '.join(sorted(specs))}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"metric {key!r} = {value!r}: expected a number")
        if not math.isfinite(value) or not spec.low <= value <= spec.high \
                or (spec.integer and value != int(value)):
            kind = "an integer" if spec.integer else "a number"
            raise PayloadError(f"metric {key!r} = {value!r}: expected {kind} in "
                               f"[{spec.low:g}, {spec.high:g}]")
        checked[key] = int(value) if spec.integer else float(value)
    return checked


def check_bounded(arrays: object, bound: float, where: str = "") -> None:
    """Every floating-point array inside ``arrays`` (an array, or mappings and sequences of
    them, as a reply check decodes them) is finite and at most ``bound`` in magnitude."""
    if isinstance(arrays, np.ndarray):
        if arrays.dtype.kind == "f" and arrays.size:
            top = max(abs(float(arrays.max())), abs(float(arrays.min())))  # no copy
            if not math.isfinite(top):
                raise PayloadError(f"{where or 'update'}: contains NaN or Inf")
            if top > bound:
                raise PayloadError(f"{where or 'update'}: |value| up to {top:.3g}, above "
                                   f"strategy.max_abs_value = {bound:g}")
    elif isinstance(arrays, Mapping):
        for key, value in arrays.items():
            check_bounded(value, bound, str(key))
    elif isinstance(arrays, tuple | list):
        for value in arrays:
            check_bounded(value, bound, where)
