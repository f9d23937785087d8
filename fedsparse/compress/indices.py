"""Compact, exactly counted encodings of a sorted set of coordinates of a d-vector.

Three encodings; :func:`encode` picks the one with the fewest bytes:

- ``plain``: the indices in the smallest unsigned dtype that holds ``d - 1``;
- ``delta``: the first index and the gaps between consecutive indices, each as an LEB128
  varint (7 bits per byte, high bit = "more bytes follow"): about 1-2 bytes per index at
  1% density;
- ``bitmap``: one bit per coordinate, ``ceil(d / 8)`` bytes (``np.packbits``).

The name of the encoding travels as the suffix of the array's key (``idx.plain``,
``idx.delta``, ``idx.bitmap``); the bytes counted are the array's ``nbytes``. :func:`decode`
validates everything it reads: dtype, range, strict order, lengths, padding, well-formedness.
Since :func:`encode` never sends a coding longer than the bitmap, :func:`decode` refuses one
before decoding it: what decoding allocates stays a small multiple of ``d`` bytes, whatever
a sender puts in the array.
"""

from __future__ import annotations

import numpy as np

from fedsparse.payload import PayloadError

SCHEMES = ("plain", "delta", "bitmap")
KEY = "idx"


def index_dtype(d: int) -> np.dtype:
    """The smallest unsigned dtype that holds every index of a d-vector."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if d - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"dimension {d} too large")


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 encoding of non-negative integers, as uint8 (vectorised)."""
    values = np.asarray(values, dtype=np.uint64)
    if values.size == 0:
        return np.zeros(0, np.uint8)
    nbytes = np.ones(values.shape, np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    owner = np.repeat(np.arange(values.size), nbytes)  # which value each output byte encodes
    first = np.cumsum(nbytes) - nbytes
    position = np.arange(owner.size) - first[owner]  # byte number within its value
    chunk = (values[owner] >> (np.uint64(7) * position.astype(np.uint64))) & np.uint64(0x7F)
    more = position < nbytes[owner] - 1
    return (chunk | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)


def varint_decode(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`varint_encode`; raises PayloadError on malformed input."""
    if data.dtype != np.uint8 or data.ndim != 1:
        raise PayloadError(f"varint data must be 1-D uint8, got {data.dtype} {data.shape}")
    if data.size == 0:
        return np.zeros(0, np.uint64)
    last = (data & 0x80) == 0
    if not last[-1]:
        raise PayloadError("varint data ends inside a number")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 9:  # 9 * 7 = 63 bits
        raise PayloadError("varint number longer than 63 bits")
    owner = np.repeat(np.arange(ends.size), lengths)
    position = (np.arange(data.size) - starts[owner]).astype(np.uint64)
    parts = (data & 0x7F).astype(np.uint64) << (np.uint64(7) * position)
    return np.bitwise_or.reduceat(parts, starts).astype(np.uint64)


def encode(idx: np.ndarray, d: int) -> tuple[str, np.ndarray]:
    """``(key, array)`` of the cheapest encoding of sorted unique indices ``idx`` of a d-vector."""
    idx = np.asarray(idx, dtype=np.int64)
    plain = idx.astype(index_dtype(max(d, 1)))
    gaps = np.diff(idx, prepend=0) if idx.size else idx
    delta = varint_encode(gaps)
    mask = np.zeros(d, bool)
    mask[idx] = True
    bitmap = np.packbits(mask)
    candidates = {"plain": plain, "delta": delta, "bitmap": bitmap}
    scheme = min(SCHEMES, key=lambda s: (candidates[s].nbytes, SCHEMES.index(s)))
    return f"{KEY}.{scheme}", candidates[scheme]


def find(payload: dict[str, np.ndarray], prefix: str = "") -> tuple[str, np.ndarray]:
    """The one index array under ``prefix`` in ``payload``: ``(scheme, array)``."""
    keys = [k for k in payload if k.startswith(f"{prefix}{KEY}.")]
    if len(keys) != 1:
        raise PayloadError(f"expected one '{prefix}{KEY}.<plain|delta|bitmap>' array, "
                           f"found {sorted(keys) or 'none'}")
    scheme = keys[0][len(prefix) + len(KEY) + 1:]
    if scheme not in SCHEMES:
        raise PayloadError(f"unknown index encoding {scheme!r}; allowed: {', '.join(SCHEMES)}")
    return scheme, payload[keys[0]]


def _not_longer_than_bitmap(scheme: str, data: np.ndarray, d: int) -> None:
    if data.nbytes > (d + 7) // 8:
        raise PayloadError(f"{scheme} coding of {data.nbytes} bytes is longer than the "
                           f"{(d + 7) // 8}-byte bitmap of d={d} (the sender picks the shortest)")


def decode(scheme: str, data: np.ndarray, d: int) -> np.ndarray:
    """Sorted unique int64 indices in ``[0, d)``; raises PayloadError if ``data`` is malformed."""
    if data.ndim != 1:
        raise PayloadError(f"index array must be 1-D, got shape {data.shape}")
    if scheme == "bitmap":
        if data.dtype != np.uint8 or data.size != (d + 7) // 8:
            raise PayloadError(f"bitmap must be {(d + 7) // 8} uint8 bytes for d={d}, "
                               f"got {data.size} {data.dtype}")
        bits = np.unpackbits(data)
        if bits[d:].any():
            raise PayloadError("bitmap has bits set beyond the vector's length")
        return np.flatnonzero(bits[:d]).astype(np.int64)
    if scheme == "plain":
        if data.dtype != index_dtype(max(d, 1)):
            raise PayloadError(f"plain indices must be {index_dtype(max(d, 1))} for d={d}, "
                               f"got {data.dtype}")
        _not_longer_than_bitmap(scheme, data, d)
        idx = data.astype(np.int64)
    else:
        _not_longer_than_bitmap(scheme, data, d)
        gaps = varint_decode(data)
        if gaps.size and (gaps[1:] == 0).any():
            raise PayloadError("delta-coded indices repeat an index (zero gap)")
        if gaps.size and gaps.max() >= np.uint64(max(d, 1)):
            raise PayloadError(f"delta-coded index out of range [0, {d})")
        idx = np.cumsum(gaps.astype(np.int64)) if gaps.size else np.zeros(0, np.int64)
    if idx.size and (idx[0] < 0 or idx[-1] >= d):
        raise PayloadError(f"index out of range [0, {d})")
    if idx.size > 1 and (np.diff(idx) <= 0).any():
        raise PayloadError("indices are not strictly increasing")
    return idx
