"""Server strategy mechanics without Ray: sampling, ordering, validation, bytes, FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedsparse.scenario import parse_scenario
from strategies.directory import Registered
from strategies.records import from_numpy, to_numpy
from strategies.server_app import build_strategy, initial_arrays
from tests.conftest import digits_scenario

pytestmark = pytest.mark.usefixtures("flower_task")


def make(fraction_train: float = 0.5, num_clients: int = 6, seed: int = 7):
    scenario = parse_scenario(digits_scenario(
        seed=seed, data={"num_clients": num_clients},
        strategy={"fraction_train": fraction_train}))
    strategy = build_strategy(scenario)
    # Flower node ids are random per run: any mapping must give the same behaviour
    rng = np.random.default_rng()
    strategy.bind(Registered(scenario, {int(rng.integers(1, 2**62)): pid
                                        for pid in range(num_clients)}))
    strategy.examples_cap = 1000  # these tests are about mechanics, not the example bound
    return scenario, strategy, initial_arrays(scenario)


def reply(message: Message, arrays: dict[str, np.ndarray] | None, **metrics) -> Message:
    """A reply as the ClientApp sends it: metrics stamped with the round they answer."""
    metrics["server-round"] = message.content.config_records["config"]["server-round"]
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = from_numpy(arrays)
    return Message(content, reply_to=message)


def nbytes(arrays: ArrayRecord) -> int:
    return sum(a.nbytes for a in to_numpy(arrays).values())


def test_sampling_is_seeded_by_partition_id_not_node_id():
    _, a, arrays = make(fraction_train=0.5)
    _, b, _ = make(fraction_train=0.5)
    for rnd in (1, 2, 3):
        assert a.sample(rnd, "train") == b.sample(rnd, "train")
        assert len(a.sample(rnd, "train")) == 3
    assert len({tuple(a.sample(r, "train")) for r in range(1, 20)}) > 1  # varies by round
    _, other_seed, _ = make(fraction_train=0.5, seed=8)
    assert [other_seed.sample(r, "train") for r in range(1, 6)] != [
        a.sample(r, "train") for r in range(1, 6)]
    messages = list(a.configure_train(1, arrays, ConfigRecord(), grid=None))
    sampled = a.sample(1, "train")
    assert [m.metadata.dst_node_id for m in messages] == [a.bound.node(p) for p in sampled]
    assert [m.content['config']['partition-id'] for m in messages] == sampled
    assert all(m.content["config"]["server-round"] == 1 for m in messages)


def test_min_clients_and_full_participation():
    _, strategy, _ = make(fraction_train=0.01)
    assert len(strategy.sample(1, "train")) == 1  # min_train_clients
    _, strategy, _ = make(fraction_train=1.0)
    assert strategy.sample(4, "train") == list(range(6))


def local_models(arrays: ArrayRecord, k: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = to_numpy(arrays)
    return [{key: (v + rng.normal(size=v.shape)).astype(v.dtype) for key, v in base.items()}
            for _ in range(k)]


def test_fedavg_is_the_sample_weighted_mean_whatever_the_reply_order():
    _, strategy, arrays = make(fraction_train=0.5)
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))
        models = local_models(arrays, len(messages))
        weights = [10, 30, 60]
        replies = [reply(messages[i], models[i], **{"num-examples": weights[i]}) for i in order]
        new, metrics = strategy.aggregate_train(1, replies)
        results.append(to_numpy(new))
        for key, value in results[-1].items():
            expected = sum(w * m[key].astype(np.float64) for w, m in zip(weights, models,
                                                                        strict=True)) / 100
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
        assert metrics["clients_ok"] == 3
    for key in results[0]:
        assert np.array_equal(results[0][key], results[1][key])  # bitwise, any order


def test_bytes_are_the_nbytes_of_the_arrays_in_each_message():
    _, strategy, arrays = make(fraction_train=0.5)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))
    half = {k: v.astype(np.float16) for k, v in to_numpy(arrays).items()}
    replies = [reply(m, to_numpy(arrays), **{"num-examples": 5}) for m in messages[:2]]
    replies.append(reply(messages[2], half, **{"num-examples": 5}))  # rejected: wrong dtype
    _, metrics = strategy.aggregate_train(1, replies)
    model_bytes = nbytes(arrays)
    records = [r for r in strategy.client_records if r.round == 1]
    assert [r.downlink_bytes for r in records] == [model_bytes] * 3
    assert [r.uplink_bytes for r in records] == [model_bytes, model_bytes, model_bytes // 2]
    assert metrics["downlink_bytes"] == 3 * model_bytes
    assert metrics["uplink_bytes"] == 2 * model_bytes + model_bytes // 2


def corrupt(arrays: ArrayRecord, how: str) -> dict[str, np.ndarray] | None:
    model = to_numpy(arrays)
    key = next(iter(model))
    if how == "nan":
        model[key] = model[key].copy()
        model[key].flat[3] = np.nan
    elif how == "inf":
        model[key] = np.full_like(model[key], np.inf)
    elif how == "shape":
        model[key] = model[key][:-1]
    elif how == "dtype":
        model[key] = model[key].astype(np.float64)
    elif how == "missing":
        del model[key]
    elif how == "extra":
        model["evil"] = np.zeros(3, np.float32)
    elif how == "no-arrays":
        return None
    return model


@pytest.mark.parametrize(("how", "reason"), [
    ("nan", "contains NaN or Inf"), ("inf", "contains NaN or Inf"), ("shape", "shape"),
    ("dtype", "dtype float64, expected float32"), ("missing", "missing ['1.weight']"),
    ("extra", "extra ['evil']"), ("no-arrays", "no ArrayRecord 'arrays'"),
])
def test_a_malformed_reply_is_rejected_and_the_round_goes_on(how, reason):
    _, strategy, arrays = make(fraction_train=0.5)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))
    good = local_models(arrays, 2)
    replies = [reply(messages[0], good[0], **{"num-examples": 4}),
               reply(messages[1], corrupt(arrays, how), **{"num-examples": 4}),
               reply(messages[2], good[1], **{"num-examples": 4})]
    new, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients_ok"] == 2 and metrics["clients_rejected"] == 1
    bad = [r for r in strategy.client_records if r.status == "rejected"]
    assert len(bad) == 1 and reason in bad[0].reason
    assert bad[0].partition_id == strategy.sample(1, "train")[1]
    for key, value in to_numpy(new).items():  # the mean of the two good models only
        np.testing.assert_allclose(value, (good[0][key] + good[1][key]) / 2, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("num_examples", [0, -3, 2.5, "many"])
def test_bad_num_examples_is_rejected(num_examples):
    _, strategy, arrays = make(fraction_train=0.2)
    (message,) = strategy.configure_train(1, arrays, ConfigRecord(), None)
    content = RecordDict({"arrays": arrays})
    content["metrics"] = MetricRecord({"server-round": 1} if isinstance(num_examples, str)
                                      else {"num-examples": num_examples, "server-round": 1})
    new, metrics = strategy.aggregate_train(1, [Message(content, reply_to=message)])
    assert new is None and metrics["clients_rejected"] == 1
    assert "num-examples" in strategy.client_records[-1].reason


def test_errors_and_missing_replies_are_recorded():
    _, strategy, arrays = make(fraction_train=0.5)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))
    replies = [Message(Error(code=0, reason="ClientApp crashed"), reply_to=messages[0]),
               reply(messages[1], to_numpy(arrays), **{"num-examples": 3})]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics["clients_failed"] == 2 and metrics["clients_ok"] == 1
    statuses = {r.status: r.reason for r in strategy.client_records}
    assert statuses == {"failed": "ClientApp crashed", "ok": "",
                        "no-reply": "no reply before the round timeout"}


def test_an_unreachable_node_is_recorded_as_unavailable():
    """Flower's NODE_UNAVAILABLE (a node the SuperLink cannot reach) is its own status; like
    any other error reply it counts as failed in the round's counters."""
    _, strategy, arrays = make(fraction_train=0.5)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))
    replies = [Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node offline"),
                       reply_to=messages[0]),
               Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"),
                       reply_to=messages[1]),
               reply(messages[2], to_numpy(arrays), **{"num-examples": 3})]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics["clients_failed"] == 2 and metrics["clients_ok"] == 1
    assert [(r.status, r.reason) for r in strategy.client_records] == [
        ("unavailable", "node offline"), ("failed", "boom"), ("ok", "")]


def test_federated_evaluation_mean_and_weighted():
    _, strategy, arrays = make()
    messages = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), None))
    assert len(messages) == 6  # fraction_evaluate = 1
    accs, counts = [0.5, 1.0, 0.0, 0.25, 0.75, 1.0], [10, 20, 30, 40, 50, 60]
    replies = [reply(m, None, **{"num-examples": n, "eval-acc": a, "eval-loss": 1 - a})
               for m, a, n in zip(messages, accs, counts, strict=True)]
    metrics = strategy.aggregate_evaluate(2, replies)
    assert metrics["fed_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert metrics["fed_accuracy_weighted"] == pytest.approx(np.average(accs, weights=counts))
    assert metrics["fed_loss_weighted"] == pytest.approx(1 - np.average(accs, weights=counts))
    assert metrics["fed_accuracy_bottom10"] == 0.0  # the worst of 6 clients: at least one
    assert metrics["eval_downlink_bytes"] == 6 * nbytes(arrays)


def test_federated_evaluation_below_min_evaluate_replies_is_not_reported():
    scenario = parse_scenario(digits_scenario(strategy={"min_evaluate_replies": 4}))
    strategy = build_strategy(scenario)
    strategy.bind(Registered(scenario, {50 + pid: pid for pid in range(6)}))
    messages = list(strategy.configure_evaluate(1, initial_arrays(scenario), ConfigRecord(),
                                                None))
    replies = [reply(m, None, **{"num-examples": 2, "eval-acc": 0.5, "eval-loss": 1.0})
               for m in messages[:3]]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["eval_clients_ok"] == 3 and metrics["eval_counted"] == 0
    assert not [k for k in metrics if k.startswith("fed_")]


@pytest.mark.parametrize(("strategy", "message"), [
    ({"fraction_train": 0.5, "min_train_replies": 4},
     "strategy.min_train_replies = 4 exceeds the 3 clients sampled per round"),
    ({"fraction_evaluate": 0.5, "min_evaluate_replies": 5},
     "strategy.min_evaluate_replies = 5 exceeds the 3 clients sampled per round"),
])
def test_unreachable_reply_minimums_are_refused(strategy, message):
    from fedsparse.scenario import ScenarioError

    with pytest.raises(ScenarioError, match=message):
        parse_scenario(digits_scenario(strategy=strategy))


@pytest.mark.parametrize(("rounds", "failed", "verdict"), [
    (10, 0, ""), (10, 5, ""),
    (10, 6, "6 of 10 rounds did not count, more than run.max_failed_round_fraction = 0.5"),
    (3, 3, "no round counted (3 of 3 failed)"),
])
def test_a_run_fails_when_too_many_rounds_did_not_count(rounds, failed, verdict):
    scenario = parse_scenario(digits_scenario())
    assert scenario.run.verdict(rounds, failed) == verdict
