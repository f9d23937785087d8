"""Corrupted replies: every kind of bad reply that the server's checks know to reject, made
from a real one.

One function per kind (``fedsparse.scenario.CORRUPTIONS``), shared by the fault injector
(``clients/faults.py``: a client whose reply is damaged on the way, after it produced and
saved it) and by the tests of the server's checks (``tests/test_hostile_replies.py``), so
that what is injected is exactly what is known to be rejected. Kinds of
``REPLY_CORRUPTIONS`` change a reply's metrics or records and apply to any reply; the others
change its arrays, which only train replies carry. The reply given is never modified.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsparse.protocol import METRICS, NUM_EXAMPLES, SERVER_ROUND

Record = ArrayRecord | MetricRecord | ConfigRecord
Records = dict[str, Record]
EXTRA = "fault-extra"  # the name of what an extra record, array or metric is added as
HUGE_ENTRIES = 10**12  # what a forged header declares
HUGE_VALUE = 3e38  # finite in float32, far beyond strategy.max_abs_value
T = TypeVar("T")


@dataclass(frozen=True)
class Situation:
    """What a corruption may need besides the reply: the round it answers, the most
    examples the client can hold for this phase, and randomness (which array, which bytes)."""

    server_round: int
    examples_bound: int
    rng: np.random.Generator


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """A well-formed ``.npy`` header declaring ``shape`` of ``dtype`` (e.g. ``"<f4"``)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


# -- one array's bytes or values --------------------------------------------------------------

def _raw(array: Array, data: bytes, shape: tuple[int, ...] | None = None) -> Array:
    return Array(array.dtype, array.shape if shape is None else shape, array.stype, data)


def _values(value: float) -> Callable[[Array, np.random.Generator], Array]:
    def change(array: Array, rng: np.random.Generator) -> Array:
        """One entry set to ``value`` as the array's dtype holds it (float16: 3e38 is inf)."""
        values = array.numpy().copy()
        with np.errstate(over="ignore"):
            values.flat[rng.integers(values.size)] = value
        return Array(values)
    return change


def _wrong_dtype(array: Array, rng: np.random.Generator) -> Array:
    values = array.numpy()
    other = np.float32 if values.dtype == np.float64 else np.float64
    return Array(np.ascontiguousarray(values.astype(other)))


def _wrong_shape(array: Array, rng: np.random.Generator) -> Array:
    values = array.numpy()
    return Array(np.ascontiguousarray(values.reshape(-1) if values.ndim > 1
                                      else values.reshape(1, -1)))


ArrayChange = Callable[[Array, np.random.Generator], Array]
# Kind -> how one array is changed; the kinds of FORGERIES make bytes that do not decode.
FORGERIES: dict[str, ArrayChange] = {
    "bytes_garbage": lambda a, rng: _raw(a, rng.bytes(len(a.data))),
    "bytes_empty": lambda a, rng: _raw(a, b""),
    "bytes_truncated": lambda a, rng: _raw(a, a.data[:-1]),
    "header_huge": lambda a, rng: _raw(a, npy_header((HUGE_ENTRIES,), np.dtype(a.dtype).str),
                                       (HUGE_ENTRIES,)),
    "header_shape": lambda a, rng: _raw(a, a.data, (10**9, 10**9)),  # declared != header
}
VALUE_CHANGES: dict[str, ArrayChange] = {
    "values_nan": _values(math.nan), "values_inf": _values(math.inf),
    "values_huge": _values(HUGE_VALUE),
}
ARRAY_CHANGES: dict[str, ArrayChange] = {
    **FORGERIES, **VALUE_CHANGES, "wrong_dtype": _wrong_dtype, "wrong_shape": _wrong_shape}


def _change_one_array(kind: str) -> Callable[[Records, Situation], None]:
    """Apply ``ARRAY_CHANGES[kind]`` to one array drawn from the reply's arrays (a
    floating-point one for the value kinds)."""
    def change(records: Records, at: Situation) -> None:
        floats_only = kind in VALUE_CHANGES
        name, key = _draw(at.rng, [
            (name, key) for name, record in _array_records(records).items()
            for key, array in record.items()
            if not floats_only or np.dtype(array.dtype).kind == "f"], kind)
        records[name][key] = ARRAY_CHANGES[kind](records[name][key], at.rng)
    return change


# -- the reply's metrics, records and array keys -----------------------------------------------

def _metric_list(metrics: MetricRecord, at: Situation) -> tuple[str, list[float]]:
    """One of the reply's metrics as a list (a MetricRecord may hold lists)."""
    key = _draw(at.rng, sorted(metrics), "metric_list")
    return key, [float(metrics[key])] * 2


MetricChange = Callable[[MetricRecord, Situation], tuple[str, float | list[float]]]
METRIC_CHANGES: dict[str, MetricChange] = {
    "num_examples_nan": lambda m, at: (NUM_EXAMPLES, math.nan),
    "num_examples_inf": lambda m, at: (NUM_EXAMPLES, math.inf),
    "num_examples_huge": lambda m, at: (NUM_EXAMPLES, 1e300),
    "num_examples_negative": lambda m, at: (NUM_EXAMPLES, -int(m[NUM_EXAMPLES])),
    "num_examples_beyond": lambda m, at: (NUM_EXAMPLES, at.examples_bound + 1),
    "metric_list": _metric_list,
    "metric_unknown": lambda m, at: (EXTRA, 1.0),
    "round_stale": lambda m, at: (SERVER_ROUND, at.server_round - 1),
}


def _change_metric(kind: str) -> Callable[[Records, Situation], None]:
    def change(records: Records, at: Situation) -> None:
        metrics = records[METRICS]
        key, value = METRIC_CHANGES[kind](metrics, at)
        metrics[key] = value
    return change


def _record_extra(records: Records, at: Situation) -> None:
    records[EXTRA] = ConfigRecord({"fault": "extra"})


def _record_missing(records: Records, at: Situation) -> None:
    del records[_draw(at.rng, list(records), "record_missing")]


def _array_extra(records: Records, at: Situation) -> None:
    name = _draw(at.rng, sorted(_array_records(records)), "array_extra")
    records[name][EXTRA] = Array(np.zeros(3, np.float32))


def _array_missing(records: Records, at: Situation) -> None:
    name, key = _draw(at.rng, [(name, key) for name, record in _array_records(records).items()
                               for key in record], "array_missing")
    del records[name][key]


CHANGES: dict[str, Callable[[Records, Situation], None]] = {
    **{kind: _change_metric(kind) for kind in METRIC_CHANGES},
    **{kind: _change_one_array(kind) for kind in ARRAY_CHANGES},
    "record_extra": _record_extra, "record_missing": _record_missing,
    "array_extra": _array_extra, "array_missing": _array_missing,
}


def corrupt(kind: str, content: RecordDict, at: Situation) -> RecordDict:
    """A copy of the reply ``content`` corrupted as ``kind`` says (a key of :data:`CHANGES`,
    which holds exactly ``fedsparse.scenario.CORRUPTIONS``); ValueError if the reply has
    nothing that kind changes (an array kind on a reply without arrays)."""
    records: Records = {name: type(record)(dict(record)) for name, record in content.items()}
    CHANGES[kind](records, at)
    return RecordDict(records)


def _array_records(records: Records) -> dict[str, ArrayRecord]:
    return {name: r for name, r in records.items() if isinstance(r, ArrayRecord) and r}


def _draw(rng: np.random.Generator, options: list[T], kind: str) -> T:
    if not options:
        raise ValueError(f"corruption {kind!r}: the reply has nothing it changes")
    return options[int(rng.integers(len(options)))]
