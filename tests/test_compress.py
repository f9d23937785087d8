"""Compressors and the index codec: exact round trips, unbiasedness, contraction, bytes,
and rejection of malformed payloads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsparse.compress import build_compressor, payload_bytes
from fedsparse.compress import indices as codec
from fedsparse.compress.identity import IdentitySpec
from fedsparse.compress.qsgd import QSGDSpec
from fedsparse.compress.randk import RandKSpec, coordinates
from fedsparse.compress.sign import ScaledSignSpec
from fedsparse.compress.topk import TopKSpec
from fedsparse.payload import PayloadError

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
vectors = hnp.arrays(np.float32, st.integers(0, 300), elements=finite)


@st.composite
def index_sets(draw):
    d = draw(st.integers(0, 5000))
    k = draw(st.integers(0, d))
    chosen = draw(st.sets(st.integers(0, max(d - 1, 0)), min_size=0, max_size=k)) if d else set()
    return d, np.array(sorted(chosen), np.int64)


@given(index_sets())
def test_index_codec_round_trips_and_picks_the_smallest(case):
    d, idx = case
    key, data = codec.encode(idx, d)
    scheme = key.split(".")[1]
    assert np.array_equal(codec.decode(scheme, data, d), idx)
    sizes = {"plain": idx.size * codec.index_dtype(max(d, 1)).itemsize,
             "delta": codec.varint_encode(np.diff(idx, prepend=0) if idx.size else idx).nbytes,
             "bitmap": (d + 7) // 8}
    assert data.nbytes == min(sizes.values())


@given(st.lists(st.integers(0, 2**63 - 1), max_size=50))
def test_varint_round_trip(values):
    array = np.array(values, np.uint64)
    assert np.array_equal(codec.varint_decode(codec.varint_encode(array)), array)


def test_index_codec_edge_cases():
    assert codec.encode(np.zeros(0, np.int64), 0)[1].nbytes == 0  # empty vector
    key, data = codec.encode(np.arange(1000), 1000)  # k = d: a bitmap of 125 bytes
    assert key == "idx.bitmap" and data.nbytes == 125
    key, data = codec.encode(np.array([3, 9000, 9001]), 70000)  # sparse: varint gaps
    assert key == "idx.delta" and data.nbytes == 1 + 2 + 1


@pytest.mark.parametrize(("scheme", "data", "d", "reason"), [
    ("plain", np.array([1, 1], np.uint8), 10, "not strictly increasing"),
    ("plain", np.array([3, 2], np.uint8), 10, "not strictly increasing"),
    ("plain", np.array([3, 12], np.uint8), 10, "out of range"),
    ("plain", np.array([1, 2], np.int64), 10, "must be uint8"),
    ("plain", np.array([[1, 2]], np.uint8), 10, "1-D"),
    ("delta", np.array([0x81], np.uint8), 10, "ends inside a number"),
    ("delta", np.array([2, 0], np.uint8), 10, "zero gap"),
    ("delta", np.array([5, 6], np.uint8), 10, "out of range"),
    ("bitmap", np.array([0xFF], np.uint8), 10, "must be 2 uint8 bytes"),
    ("bitmap", np.array([0, 0xFF], np.uint8), 10, "beyond the vector's length"),
])
def test_malformed_indices_are_rejected(scheme, data, d, reason):
    with pytest.raises(PayloadError, match=reason):
        codec.decode(scheme, data, d)


SPECS = [IdentitySpec(), IdentitySpec(value_dtype="float16"), IdentitySpec(value_dtype="int8"),
         IdentitySpec(value_dtype="int4"), IdentitySpec(value_dtype="int3"),
         IdentitySpec(value_dtype="int2"),
         TopKSpec(ratio=0.1), TopKSpec(ratio=0.05, value_dtype="float16"),
         TopKSpec(ratio=0.1, value_dtype="int8"), TopKSpec(ratio=0.3, value_dtype="int3"),
         TopKSpec(ratio=0.2, scope="per_tensor"),
         TopKSpec(ratio=0.2, scope="per_tensor", value_dtype="int8"),
         TopKSpec(ratio=0.2, scope="per_tensor", value_dtype="int4"),
         TopKSpec(ratio=1.0), RandKSpec(ratio=0.1), RandKSpec(ratio=0.1, value_dtype="int8"),
         RandKSpec(ratio=0.1, value_dtype="int2"),
         QSGDSpec(levels=1), QSGDSpec(levels=200), ScaledSignSpec()]
BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}


def assert_at_wire_precision(decoded, v, spec, payload, prefix="", factor=1.0):
    """``decoded`` is ``factor`` times ``v`` as ``spec.value_dtype`` carries it: cast, or for
    b-bit integers the levels (within +-L = 2^(b-1) - 1) times the scale max|v| / L (never 0
    for a non-zero v, even where it underflows), each within one level of v, in b bits apiece
    (int8: one int8 each; narrower: packed into ceil(b n / 8) uint8 bytes)."""
    if spec.value_dtype not in BITS:
        assert np.array_equal(decoded, v.astype(spec.value_dtype).astype(np.float32) * factor)
        return
    bits = BITS[spec.value_dtype]
    top_level = 2 ** (bits - 1) - 1
    scale = payload[prefix + "scale"][0]
    top = float(np.abs(v).max(initial=0))
    if top:  # max|v| / L, never 0; a step up where it would lose more than a level
        nearest = max(np.float32(top / top_level), np.float32(1e-45))
        assert float(scale) * (top_level + 1) >= top
        assert scale in (nearest, np.nextafter(nearest, np.float32(np.inf)))
    else:
        assert scale == 0
    sent = payload[prefix + "val"]
    assert sent.dtype == (np.int8 if bits == 8 else np.uint8)
    assert sent.nbytes == (bits * v.size + 7) // 8
    levels = np.rint(decoded / (np.float64(scale) * factor)) if scale else np.zeros(v.size)
    assert np.abs(levels).max(initial=0) <= top_level
    wire = levels.astype(np.float32) * scale
    assert np.array_equal(decoded, wire * factor)
    assert np.all(np.abs(wire.astype(np.float64) - v) <= scale * (1 + 1e-5))


def segments(d: int) -> list[int]:
    return [d // 3, d // 3, d - 2 * (d // 3)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.model_dump()}")
@settings(max_examples=40, deadline=None)
@given(v=vectors, seed=st.integers(0, 2**32))
@example(v=np.array([1e-45], np.float32), seed=0)  # int8: max|v| / 127 underflows float32
@example(v=np.array([1.796e-42], np.float32), seed=0)  # a subnormal scale that rounds down
def test_decode_of_encode_is_exactly_what_was_meant(spec, v, seed):
    compressor = build_compressor(spec, segments(v.size))
    payload = compressor.compress(v, np.random.default_rng(seed))
    decoded = compressor.decompress(payload, v.size)
    assert decoded.dtype == np.float32 and decoded.shape == v.shape
    assert payload_bytes(payload) == sum(a.nbytes for a in payload.values())
    assert all(a.dtype != object for a in payload.values())
    kept = decoded != 0
    if spec.name == "identity":
        assert_at_wire_precision(decoded, v, spec, payload)
    elif spec.name == "topk":
        parts = [("", 0, v.size)] if spec.scope == "global" else [
            (f"t{j}.", int(s), n) for j, (s, n) in enumerate(zip(
                np.cumsum([0, *segments(v.size)[:-1]]), segments(v.size), strict=True))]
        for prefix, start, size in parts:
            part, out = v[start:start + size], decoded[start:start + size]
            idx = codec.decode(*codec.find(payload, prefix), size)
            k = 0 if spec.ratio == 0 or size == 0 else min(size, max(1, round(spec.ratio * size)))
            assert idx.size == k
            # kept: v's values at the wire precision; dropped: zero, and no larger than kept
            assert_at_wire_precision(out[idx], part[idx], spec, payload, prefix)
            dropped = np.setdiff1d(np.arange(size), idx)
            assert not out[dropped].any()
            if k:
                assert np.abs(part[dropped]).max(initial=0) <= np.abs(part[idx]).min()
    elif spec.name == "randk":
        k = max(1, round(spec.ratio * v.size)) if v.size else 0
        idx = coordinates(int(payload["seed"][0]), v.size, k) if k else np.zeros(0, int)
        assert not np.delete(decoded, idx).any()
        assert_at_wire_precision(decoded[idx], v[idx], spec, payload,
                                 factor=np.float32(v.size / max(k, 1)))
    elif spec.name == "qsgd":
        norm = np.linalg.norm(v.astype(np.float64))
        levels = np.rint(np.abs(decoded) / max(norm, 1e-30) * spec.levels)
        assert np.all(levels <= spec.levels)
        assert np.all(np.sign(decoded[kept]) == np.sign(v[kept]))
    else:
        scale = np.float32(np.abs(v.astype(np.float64)).mean()) if v.size else 0
        assert np.array_equal(np.abs(decoded), np.full(v.size, scale, np.float32))


@settings(max_examples=60, deadline=None)
@given(v=hnp.arrays(np.float32, st.integers(1, 400), elements=finite),
       ratio=st.floats(0.0, 1.0, exclude_min=True))
def test_top_k_contraction_bound(v, ratio):
    compressor = build_compressor(TopKSpec(ratio=ratio))
    decoded = compressor.decompress(compressor.compress(v, np.random.default_rng()), v.size)
    k = min(v.size, max(1, round(ratio * v.size)))
    v64 = v.astype(np.float64)
    error = np.sum((decoded - v64) ** 2)
    assert error <= (1 - k / v.size) * np.sum(v64**2) * (1 + 1e-12) + 1e-30


def test_top_k_ties_are_deterministic():
    v = np.ones(100, np.float32)
    compressor = build_compressor(TopKSpec(ratio=0.1))
    a = compressor.compress(v, None)
    b = compressor.compress(v, None)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.count_nonzero(compressor.decompress(a, 100)) == 10


@pytest.mark.parametrize("spec", [RandKSpec(ratio=0.1), QSGDSpec(levels=1), QSGDSpec(levels=4),
                                  IdentitySpec(value_dtype="int8"),
                                  IdentitySpec(value_dtype="int4"),
                                  IdentitySpec(value_dtype="int2"),
                                  RandKSpec(ratio=0.1, value_dtype="int8")],
                         ids=lambda s: f"{s.name}-{s.value_dtype}")
def test_unbiased_compressors_average_to_the_vector(spec):
    rng = np.random.default_rng(0)
    v = rng.normal(size=50).astype(np.float32)
    v[0] = 127.0  # int8: a step of 1 (int4: 18.1, int2: 127), so the rounding is random
    compressor = build_compressor(spec)
    samples = np.stack([compressor.decompress(compressor.compress(v, rng), v.size)
                        for _ in range(20000)])
    mean, sem = samples.mean(axis=0), samples.std(axis=0) / np.sqrt(len(samples))
    assert np.all(np.abs(mean - v) <= 5 * sem + 1e-6)  # 5 standard errors, every coordinate
    # and the estimator is genuinely random (not the identity)
    assert samples.std(axis=0).max() > 0.1


def test_biased_compressors_are_biased():
    v = np.array([3.0, 1.0, 0.5, 0.0], np.float32)
    top = build_compressor(TopKSpec(ratio=0.25))
    assert np.array_equal(top.decompress(top.compress(v, None), 4), [3.0, 0, 0, 0])
    sign = build_compressor(ScaledSignSpec())
    assert np.allclose(sign.decompress(sign.compress(v, None), 4), [1.125] * 4)


GOOD = np.arange(1, 41, dtype=np.float32)


def payload_of(spec):
    return build_compressor(spec).compress(GOOD, np.random.default_rng(1))


@pytest.mark.parametrize(("spec", "tamper", "reason"), [
    (TopKSpec(ratio=0.1), lambda p: p.update(val=p["val"].astype(np.float64)), "dtype float64"),
    (TopKSpec(ratio=0.1), lambda p: p.update(val=p["val"][:-1]), "length 3, expected 4"),
    (TopKSpec(ratio=0.1), lambda p: p["val"].__setitem__(0, np.nan), "NaN or Inf"),
    (TopKSpec(ratio=0.1), lambda p: p["val"].__setitem__(1, np.inf), "NaN or Inf"),
    (TopKSpec(ratio=0.1), lambda p: p.update({"idx.bitmap": np.zeros(5, np.uint8)}),
     "expected one"),
    (TopKSpec(ratio=0.1), lambda p: p.update({"idx.plain": np.array([39, 1, 2, 3], np.uint8)}),
     "strictly increasing"),
    (TopKSpec(ratio=0.1), lambda p: p.update(extra=np.zeros(1)), "payload keys"),
    (TopKSpec(ratio=0.1), lambda p: p.pop("val"), "lacks 'val'"),
    (RandKSpec(ratio=0.1), lambda p: p.update(seed=np.array([1, 2], np.uint64)), "seed"),
    (RandKSpec(ratio=0.1), lambda p: p.update(val=np.ones(7, np.float32)), "length 7"),
    (QSGDSpec(levels=2), lambda p: p.update(norm=np.array([-1.0], np.float32)), "negative"),
    (QSGDSpec(levels=2), lambda p: p.update(lvl=np.full(p["lvl"].size, 5, np.int8)),
     "beyond"),
    (ScaledSignSpec(), lambda p: p.update(sign=np.zeros(4, np.uint8)), "length 4, expected 5"),
    (IdentitySpec(), lambda p: p.update(val=p["val"].reshape(4, 10)), "1-D"),
    (TopKSpec(ratio=0.1, value_dtype="int8"), lambda p: p.pop("scale"), "lacks 'scale'"),
    (TopKSpec(ratio=0.1, value_dtype="int8"),
     lambda p: p.update(scale=np.array([-0.5], np.float32)), "negative"),
    (TopKSpec(ratio=0.1, value_dtype="int8"),
     lambda p: p.update(scale=np.array([np.inf], np.float32)), "NaN or Inf"),
    (TopKSpec(ratio=0.1, value_dtype="int8"),
     lambda p: p.update(scale=np.array([3e38], np.float32)), "overflows"),
    (TopKSpec(ratio=0.1, value_dtype="int8"),
     lambda p: p["val"].__setitem__(0, -128), "beyond"),
    (IdentitySpec(value_dtype="int8"), lambda p: p.update(val=p["val"].astype(np.int16)),
     "dtype int16"),
    (IdentitySpec(value_dtype="int4"), lambda p: p.update(val=p["val"].view(np.int8)),
     "dtype int8, expected uint8"),
    (IdentitySpec(value_dtype="int4"), lambda p: p.update(val=p["val"][:-1]),
     "length 19, expected 20"),
    (IdentitySpec(value_dtype="int4"), lambda p: p["val"].__setitem__(3, 0xF7), "level 8 "),
    (IdentitySpec(value_dtype="int2"), lambda p: p["val"].__setitem__(0, 0xFF), "level 2 "),
    (TopKSpec(ratio=0.1, value_dtype="int3"), lambda p: p["val"].__setitem__(1, 0x80),
     "padding bits"),
    (TopKSpec(ratio=0.1, value_dtype="int3"),
     lambda p: p.update(scale=np.array([2e38], np.float32)), "overflows"),
])
def test_malformed_payloads_are_rejected_with_a_reason(spec, tamper, reason):
    payload = payload_of(spec)
    payload = {k: v.copy() for k, v in payload.items()}
    tamper(payload)
    with pytest.raises(PayloadError, match=reason):
        build_compressor(spec).decompress(payload, GOOD.size)


def test_unsorted_plain_indices_are_rejected():
    compressor = build_compressor(TopKSpec(ratio=0.1))
    payload = {"idx.plain": np.array([30, 10, 20, 35], np.uint8),
               "val": np.ones(4, np.float32)}
    with pytest.raises(PayloadError, match="strictly increasing"):
        compressor.decompress(payload, 40)
