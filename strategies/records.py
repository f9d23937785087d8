"""Translation between Flower records and numpy, and the byte count of what crosses the wire.

What the server *sends* is built from its own arrays (:func:`from_numpy`, :func:`to_numpy`).
What it *receives* is read with :func:`received_arrays`, which trusts nothing a client
declares: it parses each array's ``.npy`` header itself, admits only plain numeric dtypes,
checks that the bytes received are exactly what the header describes, and returns read-only
views of those bytes, so that checking a reply allocates nothing in proportion to what the
client claims (a header may declare 10^12 entries). Byte counts of replies come from the
bytes actually received (:func:`received_bytes`), not from the declared shape.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedsparse.payload import PayloadError

NPY_STYPE = "numpy.ndarray"
NPY_VERSIONS = ((1, 0), (2, 0))  # what np.save writes for numeric dtypes
NPY_HEADER_MAX = 4096  # bytes: np.save's header for any shape a model has is ~128
NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, floating point
MAX_NDIM = 16


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
    """Payload bytes of every ArrayRecord in a message's content (for what the server sends)."""
    return sum(array_bytes(record) for record in content.array_records.values())


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, offset of the data)`` from a ``.npy`` buffer's header, checked."""
    stream = io.BytesIO(data[:NPY_HEADER_MAX])
    try:
        version = np.lib.format.read_magic(stream)
        if version not in NPY_VERSIONS:
            raise ValueError(f"format version {version}")
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read(stream, max_header_size=NPY_HEADER_MAX)
    except Exception as err:  # any malformed header, whatever numpy raises for it
        raise PayloadError(f"not a valid .npy array ({type(err).__name__}: {err})") from None
    if fortran_order:
        raise PayloadError("Fortran-ordered arrays are not accepted")
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None \
            or not dtype.isnative:
        raise PayloadError(f"dtype {dtype.str!r} is not a plain native numeric dtype")
    if len(shape) > MAX_NDIM or any(not isinstance(n, int) or n < 0 for n in shape):
        raise PayloadError(f"shape {shape} is not a valid array shape")
    return tuple(shape), dtype, stream.tell()


def decode_array(array: Array) -> np.ndarray:
    """A received Array as a read-only view of its bytes; PayloadError unless its header is a
    plain numeric ``.npy`` header, its data is exactly the bytes that header describes, and
    Flower's declared dtype and shape agree with them."""
    data = getattr(array, "data", None)
    if getattr(array, "stype", None) != NPY_STYPE or not isinstance(data, bytes):
        raise PayloadError(f"serialisation {getattr(array, 'stype', None)!r}; expected a "
                           f"{NPY_STYPE!r} byte buffer")
    shape, dtype, offset = _npy_header(data)
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise PayloadError(f"header declares {count} x {dtype.itemsize} bytes of data, "
                           f"{len(data) - offset} bytes received")
    declared = (getattr(array, "dtype", None), tuple(getattr(array, "shape", ())))
    if declared != (dtype.name, shape):
        raise PayloadError(f"declared {declared[0]} {declared[1]} differs from its data "
                           f"({dtype.name} {shape})")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def received_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of a received record by name (:func:`decode_array`; the first bad one
    raises PayloadError naming it)."""
    arrays = {}
    for key, array in record.items():
        try:
            arrays[key] = decode_array(array)
        except PayloadError as err:
            raise PayloadError(f"{key}: {err}") from None
    return arrays


def received_bytes(content: RecordDict) -> int:
    """Payload bytes a reply actually carried: per array, the bytes after a valid ``.npy``
    header (all its bytes if the header is not valid), whatever shape it declares."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            data = getattr(array, "data", b"")
            size = len(data) if isinstance(data, bytes) else 0
            try:
                total += size - _npy_header(data)[2]
            except PayloadError:
                total += size
    return total


class Received:
    """A reply's ArrayRecords, decoded defensively (:func:`received_arrays`), by record name:
    what a strategy's reply check reads instead of the raw content."""

    def __init__(self, content: RecordDict) -> None:
        self.records: dict[str, dict[str, np.ndarray]] = {}
        for name, record in content.array_records.items():
            try:
                self.records[name] = received_arrays(record)
            except PayloadError as err:
                raise PayloadError(f"{name}/{err}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def __getitem__(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of record ``name``; PayloadError if the reply has none."""
        if name not in self.records:
            raise PayloadError(f"no ArrayRecord {name!r} in reply")
        return self.records[name]
