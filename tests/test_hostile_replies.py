"""A reply can only ever hurt itself: every decoder and every strategy's reply check, driven with
random and adversarial content (hypothesis), raises nothing but a rejection, never lets a
non-finite or out-of-bound value into the model, and allocates little while it checks.

The valid replies mutated here are real ones: the scenario's own client program answered a
real instruction on an in-process grid. Every kind of corruption the fault injector makes
(``clients/corruptions.py``) is rejected by every strategy.
"""

from __future__ import annotations

import copy
import io
import math
import re
import tracemalloc
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clients.corruptions import FORGERIES, Situation, corrupt, npy_header
from fedsparse.compress import build_compressor, indices
from fedsparse.compress.base import decode_values
from fedsparse.compress.identity import IdentitySpec
from fedsparse.compress.qsgd import QSGDSpec
from fedsparse.compress.randk import RandKSpec
from fedsparse.compress.sign import ScaledSignSpec
from fedsparse.compress.topk import TopKSpec
from fedsparse.downlink import apply_sync
from fedsparse.payload import PayloadError
from fedsparse.scenario import CORRUPTIONS, REPLY_CORRUPTIONS, Scenario, parse_scenario
from fedsparse.sparse.wire import decode_positions
from fedsparse.sparse.wire import decode_values as decode_masked
from strategies.base import FedSparseStrategy
from strategies.directory import Registered
from strategies.records import decode_array, from_numpy, received_bytes, to_numpy
from strategies.server_app import build_strategy, initial_arrays
from tests.conftest import DATA, digits_scenario
from tests.local_grid import LocalGrid, assigned

pytestmark = pytest.mark.usefixtures("flower_task")

HOSTILE = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow])
NPY_VALUES = st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e300, 0.0, 1.0])


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# -- decoders --------------------------------------------------------------------------------

@given(st.binary(max_size=300))
def test_decode_array_rejects_garbage(data):
    with pytest.raises(PayloadError):
        decode_array(Array("float32", (3,), "numpy.ndarray", data))


@pytest.mark.parametrize(("array", "reason"), [
    (Array("float32", (10**12,), "numpy.ndarray", npy_header((10**12,), "<f4")), "bytes received"),
    (Array("float32", (3,), "numpy.ndarray", npy(np.zeros(4, np.float32))), "declared"),
    (Array("float32", (4,), "numpy.ndarray", npy(np.zeros(4, np.float32))[:-1]), "received"),
    (Array("float32", (4,), "numpy.ndarray", npy(np.zeros(4, np.float32)) + b"x"), "received"),
    (Array("float32", (4,), "raw", npy(np.zeros(4, np.float32))), "serialisation"),
    (Array("float32", (2,), "numpy.ndarray", npy_header((2,), "|O")), "numeric dtype"),
    (Array("float32", (2,), "numpy.ndarray", npy_header((2,), ">f4") + bytes(8)), "native"),
    (Array("float32", (2,), "numpy.ndarray", npy_header((-2,), "<f4")), "not a valid array shape"),
    (Array("float32", (0,), "numpy.ndarray", b""), "not a valid .npy"),
])
def test_decode_array_trusts_no_declared_size(array, reason):
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match=reason):
            decode_array(array)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_decode_array_is_a_view_of_the_bytes_received():
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    decoded = decode_array(Array(value))
    np.testing.assert_array_equal(decoded, value)
    assert not decoded.flags.writeable  # nothing downstream can scribble on the reply


def test_received_bytes_count_the_data_not_the_declared_shape():
    honest = RecordDict({"a": ArrayRecord({"w": Array(np.zeros(5, np.float32))})})
    forged = RecordDict({"a": ArrayRecord({"w": Array("float32", (10**12,), "numpy.ndarray",
                                                      npy(np.zeros(5, np.float32)))})})
    garbage = RecordDict({"a": ArrayRecord({"w": Array("float32", (4,), "numpy.ndarray",
                                                       b"\x00" * 7)})})
    assert received_bytes(honest) == received_bytes(forged) == 20
    assert received_bytes(garbage) == 7


@given(st.sampled_from(indices.SCHEMES), st.binary(max_size=200),
       st.sampled_from(["uint8", "uint16", "uint64", "int64", "float32"]),
       st.integers(0, 3000))
def test_index_decoding_raises_only_payload_errors(scheme, raw, dtype, d):
    data = np.frombuffer(raw[:len(raw) // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize],
                         dtype=dtype)
    try:
        idx = indices.decode(scheme, data, d)
    except PayloadError:
        return
    assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
    assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < d)


def test_a_long_varint_is_refused_before_it_is_decoded():
    d = 199_210  # the MNIST MLP
    data = np.ones(10_000_000, np.uint8)  # 10 MB of one-byte gaps
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="longer than"):
            indices.decode("delta", data, d)
        assert tracemalloc.get_traced_memory()[1] < 4 * 4 * d
    finally:
        tracemalloc.stop()


COMPRESSORS = [IdentitySpec(), IdentitySpec(value_dtype="int3"), TopKSpec(ratio=0.1),
               TopKSpec(ratio=0.2, scope="per_tensor", value_dtype="int4"),
               RandKSpec(ratio=0.1, value_dtype="float16"), QSGDSpec(levels=4),
               ScaledSignSpec()]


@pytest.mark.parametrize("spec", COMPRESSORS, ids=lambda s: f"{s.name}-{s.value_dtype}")
@given(data=st.data())
@HOSTILE
def test_compressor_decoding_raises_only_payload_errors(spec, data):
    d, segments = 60, [40, 20]
    compressor = build_compressor(spec, segments)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    payload = dict(compressor.compress(rng.normal(size=d).astype(np.float32), rng))
    key = data.draw(st.sampled_from(sorted(payload)))
    payload = mutate_payload(payload, key, data)
    try:
        out = compressor.decompress(payload, d)
    except PayloadError:
        return
    assert out.shape == (d,) and out.dtype == np.float32


@given(st.sampled_from(["int8", "int4", "int3", "int2", "float16"]), st.binary(max_size=64),
       st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(0, 100))
def test_value_decoding_raises_only_payload_errors(dtype, raw, scale, size):
    wire = np.dtype(dtype if dtype in ("int8", "float16") else np.uint8)
    payload = {"val": np.frombuffer(raw[:len(raw) // wire.itemsize * wire.itemsize], wire),
               "scale": np.array([scale], np.float32)}
    try:
        values = decode_values(payload, dtype, size)
    except PayloadError:
        return
    assert np.isfinite(values).all() and values.size == size


@given(data=st.data())
@HOSTILE
def test_masked_model_decoding_raises_only_payload_errors(data):
    template = {"w": np.zeros((6, 5), np.float32), "b": np.zeros(5, np.float32)}
    mask = np.zeros((6, 5), bool)
    mask.flat[[1, 4, 7, 20, 29]] = True
    key, coded = indices.encode(np.flatnonzero(mask), mask.size)
    arrays = {"w": np.ones(5, np.float32), "b": np.ones(5, np.float32), f"w.{key}": coded}
    arrays = mutate_payload(arrays, data.draw(st.sampled_from(sorted(arrays))), data)
    try:
        masks = decode_positions(arrays, template)
        decode_masked({k: v for k, v in arrays.items() if ".idx." not in k}, template, masks)
    except PayloadError:
        return


@given(data=st.data())
@HOSTILE
def test_public_model_sync_decoding_raises_only_payload_errors(data):
    d = 50
    key, coded = indices.encode(np.array([2, 9, 31]), d)
    payload = mutate_payload({key: coded, "val": np.ones(3, np.float32)},
                             data.draw(st.sampled_from([key, "val"])), data)
    try:
        out = apply_sync(np.zeros(d, np.float32), payload, d)
    except PayloadError:
        return
    assert out.shape == (d,)


def mutate_payload(payload: dict[str, np.ndarray], key: str, data: st.DataObject
                   ) -> dict[str, np.ndarray]:
    """One adversarial change to ``payload[key]`` (or to its keys)."""
    value = payload[key]
    kind = data.draw(st.sampled_from(["values", "dtype", "truncate", "extend", "2d", "drop",
                                      "extra", "unsorted", "duplicate", "beyond", "padding",
                                      "unterminated"]))
    out = dict(payload)
    if kind == "values" and value.dtype.kind == "f" and value.size:
        out[key] = value.copy()
        out[key].flat[data.draw(st.integers(0, value.size - 1))] = data.draw(NPY_VALUES)
    elif kind == "dtype":
        out[key] = value.astype(data.draw(st.sampled_from(["float64", "int64", "uint8",
                                                           "float16", "bool"])))
    elif kind == "truncate":
        out[key] = value[:-1]
    elif kind == "extend":
        out[key] = np.concatenate([value, value[-1:] if value.size else np.ones(1, value.dtype)])
    elif kind == "2d":
        out[key] = value.reshape(1, -1)
    elif kind == "drop":
        del out[key]
    elif kind == "extra":
        out["evil"] = np.zeros(3, np.float32)
    elif kind == "unsorted" and value.size > 1:
        out[key] = value[::-1].copy()
    elif kind == "duplicate" and value.size > 1:
        out[key] = np.concatenate([value[:1], value[:-1]])
    elif kind == "beyond" and value.dtype.kind in "ui" and value.size:
        out[key] = value.copy()
        out[key][-1] = np.iinfo(value.dtype).max
    elif kind == "padding" and value.dtype == np.uint8 and value.size:
        out[key] = value.copy()
        out[key][-1] |= 1
    elif kind == "unterminated" and value.dtype == np.uint8:
        out[key] = np.concatenate([value, np.array([0x80], np.uint8)])
    return out


# -- strategies ------------------------------------------------------------------------------

@dataclass
class Arena:
    """A strategy that has sent one round's instructions, a real valid reply to one of them,
    and the instruction it answers."""

    scenario: Scenario
    strategy: FedSparseStrategy
    server_round: int
    instruction: Message
    reply: RecordDict
    dense_bytes: int

    def fresh(self) -> FedSparseStrategy:
        """The strategy as it was when it sent the instructions (each check starts there)."""
        return copy.deepcopy(self.strategy)

    def answer(self, content: RecordDict) -> Message:
        return Message(content, reply_to=self.instruction)


def _scenarios() -> dict[str, str]:
    controlled = digits_scenario().replace('program = "sgd"', 'program = "controlled_sgd"'
                                           ).replace("local_epochs = 3", "local_steps = 3")
    def with_strategy(text: str, section: str) -> str:
        return text.replace('name = "fedavg"', section)
    return {
        "fedavg": digits_scenario(),
        "fedavg_ef": with_strategy(digits_scenario().replace('program = "sgd"',
                                   'program = "compressed_sgd"'), 'name = "fedavg_ef"'),
        "fedavg_downlink": digits_scenario(strategy={"downlink": {"name": "topk",
                                                                  "ratio": 0.1}}),
        "scaffold": with_strategy(controlled, 'name = "scaffold"'),
        "scallion": with_strategy(controlled, 'name = "scallion"\nalpha = 0.1')
        + '[strategy.compressor]\nname = "randk"\nratio = 0.1\n',
        "scafcom": with_strategy(controlled, 'name = "scafcom"')
        + '[strategy.compressor]\nname = "topk"\nratio = 0.05\nvalue_dtype = "int4"\n',
        "sparse_fedavg": (DATA / "continual_digits.toml").read_text(),
        "pfedgate": (DATA / "pfedgate_digits.toml").read_text(),
        "flasc": (DATA / "lora_tiny.toml").read_text(),
    }


@cache
def arena(name: str) -> Arena:
    scenario = parse_scenario(_scenarios()[name])
    grid = LocalGrid(scenario.data.num_clients, {"scenario": scenario.to_toml()})
    strategy = build_strategy(scenario)
    strategy.bind(assigned(grid, scenario))
    arrays = initial_arrays(scenario)
    if name == "sparse_fedavg":  # round 2: the round whose reply carries TDM's signal
        strategy.aggregate_train(1, grid.pull_messages(grid.push_messages(
            strategy.configure_train(1, arrays, ConfigRecord(), grid))))
    server_round = 2 if name == "sparse_fedavg" else 1
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    (reply, *_) = grid.pull_messages(grid.push_messages(messages[:1]))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    dense = sum(a.nbytes for a in to_numpy(arrays).values())
    return Arena(scenario, strategy, server_round, messages[0], reply.content, dense)


def mutate_reply(content: RecordDict, data: st.DataObject) -> RecordDict:
    """The reply with one to three adversarial changes: to its records, its arrays' bytes or
    values, its indices, its metrics."""
    records = {name: dict(record) for name, record in content.array_records.items()}
    metrics = dict(content.metric_records["metrics"])
    extra_records: dict[str, object] = {}
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(["array", "bytes", "metric", "record"]))
        if target == "metric":
            key = data.draw(st.sampled_from([*sorted(metrics), "evil"]))
            metrics[key] = data.draw(st.sampled_from(
                [math.nan, math.inf, -math.inf, 1e300, -3, 0, 2.5, 10**9, [1.0, 2.0], [3]]))
        elif target == "record":
            kind = data.draw(st.sampled_from(["drop", "config", "arrays"]))
            if kind == "drop" and records:
                del records[data.draw(st.sampled_from(sorted(records)))]
            elif kind == "config":
                extra_records["cfg"] = ConfigRecord({"evil": "x"})
            else:
                records["evil"] = {"x": Array(np.zeros(3, np.float32))}
        elif records:
            name = data.draw(st.sampled_from(sorted(records)))
            if not records[name]:
                continue
            key = data.draw(st.sampled_from(sorted(records[name])))
            array = records[name][key]
            if target == "bytes":
                records[name][key] = forged(array, data)
                continue
            try:  # an earlier change may have made it undecodable
                value = decode_array(array)
            except PayloadError:
                continue
            else:
                mutated = mutate_payload({key: value}, key, data)
                records[name] = {**{k: v for k, v in records[name].items() if k != key},
                                 **{k: Array(np.ascontiguousarray(v)) for k, v in mutated.items()}}
    out = RecordDict({name: ArrayRecord(arrays) for name, arrays in records.items()})
    out["metrics"] = MetricRecord(metrics)
    for name, record in extra_records.items():
        out[name] = record
    return out


def forged(array: Array, data: st.DataObject) -> Array:
    """The array with bytes that do not decode, or a header that lies about its size (the
    forgeries of the fault injector)."""
    kind = data.draw(st.sampled_from(sorted(FORGERIES)))
    return FORGERIES[kind](array, np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))))


STRATEGIES = list(_scenarios())


@pytest.mark.parametrize("name", STRATEGIES)
@given(data=st.data())
@HOSTILE
def test_no_reply_escapes_a_strategy_check(name, data, caplog):
    """Zero exceptions escape (and none is caught as an internal error: every rejection is a
    PayloadError), the model stays finite, and the peak memory allocated while checking one
    reply stays under 4x the dense model + 64 MB."""
    a = arena(name)
    strategy, message = a.fresh(), a.answer(mutate_reply(a.reply, data))
    caplog.clear()
    tracemalloc.start()
    try:
        new, metrics = strategy.aggregate_train(a.server_round, [message])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert metrics["clients_ok"] + metrics["clients_rejected"] == 1
    assert "reply check raised" not in caplog.text
    assert peak < 4 * a.dense_bytes + (64 << 20)
    if new is not None:
        for value in to_numpy(new).values():
            assert np.isfinite(value).all()


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_unmutated_reply_is_accepted(name):
    """The property above would hold for a strategy that rejected everything."""
    a = arena(name)
    new, metrics = a.fresh().aggregate_train(a.server_round, [a.answer(a.reply)])
    assert metrics["clients_ok"] == 1 and new is not None


@pytest.mark.parametrize(("metric", "value", "reason"), [
    ("num-examples", math.nan, "expected an integer"),
    ("num-examples", math.inf, "expected an integer"),
    ("num-examples", 1e300, "expected an integer in"),
    ("num-examples", 10_000, "more than the"),
    ("eval-acc", [0.5, 0.5], "expected a number"),
    ("eval-acc", 1.5, "in [0, 1]"),
    ("server-round", 7, "another round"),
    ("evil", 1.0, "not one a client reports"),
])
def test_evaluate_replies_are_checked_against_what_the_server_knows(metric, value, reason):
    scenario = parse_scenario(digits_scenario())
    strategy = build_strategy(scenario)
    strategy.bind(Registered(scenario, {100 + p: p for p in range(scenario.data.num_clients)}))
    (message, *_) = strategy.configure_evaluate(1, initial_arrays(scenario), ConfigRecord(),
                                                None)
    metrics = {"num-examples": 3, "eval-acc": 0.5, "eval-loss": 1.0, "server-round": 1}
    metrics[metric] = value
    accepted = strategy.aggregate_evaluate(1, [Message(RecordDict(
        {"metrics": MetricRecord(metrics)}), reply_to=message)])
    assert accepted["eval_clients_rejected"] == 1
    (record,) = [r for r in strategy.client_records if r.status == "rejected"]
    assert reason in record.reason


def test_num_examples_is_bounded_by_the_partition_in_simulation():
    a = arena("fedavg")
    strategy = a.fresh()
    bound = strategy.example_bound(LocalGrid.partition_of(a.instruction), "train")
    content = RecordDict({"arrays": a.reply.array_records["arrays"],
                          "metrics": MetricRecord({**a.reply.metric_records["metrics"],
                                                   "num-examples": bound + 1})})
    new, metrics = strategy.aggregate_train(a.server_round, [a.answer(content)])
    assert new is None and metrics["clients_rejected"] == 1
    assert 0 < bound == a.reply.metric_records["metrics"]["num-examples"]


def test_a_huge_finite_model_is_rejected():
    a = arena("fedavg")
    strategy = a.fresh()
    model = {k: np.full_like(v, 3e38) for k, v in to_numpy(a.reply.array_records["arrays"]).items()}
    content = RecordDict({"arrays": from_numpy(model),
                          "metrics": a.reply.metric_records["metrics"]})
    new, _ = strategy.aggregate_train(a.server_round, [a.answer(content)])
    assert new is None
    (record,) = [r for r in strategy.client_records if r.status == "rejected"]
    assert "max_abs_value" in record.reason


# -- the fault injector's corruptions ------------------------------------------------------

# What each kind is rejected for, where that does not depend on the strategy's payload.
REASONS = {
    "num_examples_nan": r"metric 'num-examples' = nan: expected an integer in \[1, ",
    "num_examples_inf": r"metric 'num-examples' = inf: expected an integer in \[1, ",
    "num_examples_huge": r"metric 'num-examples' = 1e\+300: expected an integer in \[1, ",
    "num_examples_negative": r"metric 'num-examples' = -\d+: expected an integer in \[1, ",
    "num_examples_beyond": r"num-examples = (\d+): more than the \d+ this client can have",
    "metric_list": r"metric '[a-z-]+' = \[.+\]: expected a number",
    "metric_unknown": r"metric 'fault-extra' is not one a client reports",
    "record_extra": r"unexpected records \['fault-extra'\]",
    "record_missing": r"no (MetricRecord 'metrics'|ArrayRecord '[a-z-]+') in reply",
    "bytes_garbage": r"not a valid \.npy array",
    "bytes_empty": r"not a valid \.npy array",
    "bytes_truncated": r"header declares \d+ x \d bytes of data, \d+ bytes received",
    "header_huge": r"header declares 1000000000000 x \d bytes of data, 0 bytes received",
    "header_shape": r"declared \w+ \(1000000000, 1000000000\) differs from its data",
    "values_nan": r"contains NaN or Inf",
    "values_inf": r"contains NaN or Inf",
}


def stale_reason(server_round: int) -> str:
    """Round 0 does not exist: a stale round 1 reply is out of the metric's range."""
    return (rf"server-round = {server_round - 1}: a reply to another round than {server_round}"
            if server_round > 1 else r"metric 'server-round' = 0: expected an integer in \[1, ")


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_injected_corruption_is_rejected(name, kind, caplog):
    a = arena(name)
    strategy = a.fresh()
    pid = LocalGrid.partition_of(a.instruction)
    at = Situation(a.server_round, strategy.example_bound(pid, "train"),
                   np.random.default_rng(0))
    caplog.clear()
    _, metrics = strategy.aggregate_train(a.server_round,
                                          [a.answer(corrupt(kind, a.reply, at))])
    assert metrics["clients_rejected"] == 1 and metrics["round_counted"] == 0
    assert "reply check raised" not in caplog.text  # a PayloadError, no check tripping over it
    (record,) = [r for r in strategy.client_records
                 if r.partition_id == pid and r.round == a.server_round]
    assert record.status == "rejected"
    reason = stale_reason(a.server_round) if kind == "round_stale" else REASONS.get(kind, "")
    assert re.search(reason, record.reason), record.reason


def evaluated(content: RecordDict, server_round: int = 2) -> FedSparseStrategy:
    """A FedAvg server that sent round ``server_round``'s evaluate instructions and received
    ``content`` from the first client."""
    scenario = parse_scenario(digits_scenario())
    strategy = build_strategy(scenario)
    strategy.bind(Registered(scenario, {100 + p: p for p in range(scenario.data.num_clients)}))
    (message, *_) = strategy.configure_evaluate(server_round, initial_arrays(scenario),
                                                ConfigRecord(), None)
    strategy.aggregate_evaluate(server_round, [Message(content, reply_to=message)])
    return strategy


@pytest.mark.parametrize("kind", REPLY_CORRUPTIONS)
def test_every_corruption_of_an_evaluate_reply_is_rejected(kind):
    honest = RecordDict({"metrics": MetricRecord(
        {"num-examples": 3, "eval-acc": 0.5, "eval-loss": 1.0, "server-round": 2})})
    assert evaluated(honest).client_records[0].status == "ok"
    at = Situation(2, evaluated(honest).example_bound(0, "evaluate"), np.random.default_rng(0))
    record = evaluated(corrupt(kind, honest, at)).client_records[0]
    assert record.status == "rejected"
    reason = stale_reason(2) if kind == "round_stale" else REASONS[kind]
    assert re.search(reason, record.reason), record.reason


def test_an_array_corruption_needs_arrays():
    with pytest.raises(ValueError, match="corruption 'values_nan': the reply has nothing it "
                                         "changes"):
        corrupt("values_nan", RecordDict({"metrics": MetricRecord({"num-examples": 3})}),
                Situation(1, 10, np.random.default_rng(0)))
