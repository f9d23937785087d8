"""SCAFFOLD / SCALLION / SCAFCOM through the real ServerApp loop, strategies and ClientApp,
on an in-process grid (no Ray): client state as of the server's commit, the c = mean c_i
invariant with and without lost messages, byte accounting of compressed payloads,
reductions to SCAFFOLD."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, Error, Message

from fedsparse.compress import payload_bytes
from fedsparse.flat import flatten
from fedsparse.scenario import Scenario, parse_scenario
from strategies.records import to_numpy
from strategies.server_app import build_strategy
from tests.conftest import digits_scenario
from tests.local_grid import LocalGrid, run_federation

pytestmark = pytest.mark.usefixtures("flower_task")


def scenario(strategy: dict, rounds: int = 4) -> Scenario:
    text = digits_scenario(strategy=strategy, run={"rounds": rounds, "eval_every": rounds})
    text = text.replace('program = "sgd"', 'program = "controlled_sgd"').replace(
        "local_epochs = 3", "local_steps = 5")
    return parse_scenario(text)


def run(scn: Scenario, tamper=None, on_round=None):
    hook = None if on_round is None else (lambda rnd, f: on_round(rnd, f.grid, f.strategy))
    f = run_federation(scn, tamper, hook)
    return f.grid, f.strategy, f.state, f.rows, f.records


def committed_c_i(grid: LocalGrid, strategy, pid: int) -> np.ndarray:
    """c_i as client ``pid`` holds it after the server's last commit of its updates."""
    state = grid.client_state(pid, strategy.accepted_round.get(pid, 0))
    return state["control"]["c_i"] if state else np.zeros_like(strategy.c)


def check_invariant(rnd, grid, strategy):
    c_mean = np.mean([committed_c_i(grid, strategy, p) for p in range(strategy.num_clients)],
                     axis=0)
    np.testing.assert_allclose(strategy.c, c_mean, atol=1e-6)


SCAFCOM_TOPK = {"name": "scafcom", "beta": 0.3, "audit": True,
                "compressor": {"name": "topk", "ratio": 0.1, "value_dtype": "float16"}}


def test_client_state_persists_and_c_is_the_mean_of_all_c_i():
    grid, strategy, _, rows, records = run(scenario(SCAFCOM_TOPK), on_round=check_invariant)
    assert all(row["audit_control_gap"] < 1e-6 for row in rows)  # the server's own audit
    assert np.abs(strategy.c).max() > 0
    sampled = {r.partition_id for r in records if r.phase == "train"}
    never = set(range(6)) - sampled
    for pid in sampled:  # clients keep c_i and v_i between rounds, sampled or not
        held = grid.client_state(pid, strategy.accepted_round[pid])["control"]
        assert np.abs(held["v_i"]).max() > 0
    for pid in never:
        assert not (grid.state_dir / "local-grid-run" / str(pid)).exists()


def test_a_rejected_message_does_not_move_c_i():
    def nan_in_round_2(message: Message, reply: Message) -> Message:
        config = message.content.config_records.get("config")
        if config is None or config.get("server-round") != 2 or "update" not in \
                reply.content.array_records:
            return reply
        update = reply.content.array_records["update"]
        values = update["val"].numpy().copy()
        values[0] = np.nan
        update["val"] = Array(values)
        return reply

    _grid, _strategy, _, rows, records = run(scenario(SCAFCOM_TOPK), tamper=nan_in_round_2,
                                  on_round=check_invariant)
    rejected = [r for r in records if r.status == "rejected"]
    assert rejected and all(r.round == 2 and "NaN" in r.reason for r in rejected)
    assert rows[1]["clients_rejected"] == len(rejected)
    assert all(row["audit_control_gap"] < 1e-6 for row in rows)


def test_an_update_that_overflows_when_decoded_is_rejected():
    """Finite float32 values that rand-k's d/k rescaling takes to inf."""
    def huge(message: Message, reply: Message) -> Message:
        if "update" in reply.content.array_records and LocalGrid.partition_of(message) == 0:
            update = reply.content.array_records["update"]
            update["val"] = Array(np.full_like(update["val"].numpy(), 3e38))
        return reply

    scallion = {"name": "scallion", "alpha": 0.1, "audit": True,
                "compressor": {"name": "randk", "ratio": 0.1}}
    with pytest.warns(RuntimeWarning, match="overflow"):  # the server's decode, then refusal
        _grid, strategy, state, rows, records = run(scenario(scallion), tamper=huge,
                                          on_round=check_invariant)
    assert all(row["audit_control_gap"] < 1e-6 for row in rows)
    rejected = [r for r in records if r.status == "rejected"]
    assert rejected and all(r.partition_id == 0 and "contains NaN or Inf" in r.reason
                            for r in rejected)
    assert np.isfinite(strategy.c).all()
    assert all(np.isfinite(a).all() for a in to_numpy(state.arrays).values())


def test_an_aggregate_that_overflows_leaves_the_model_and_c_unchanged():
    """Each message within max_abs_value, the model step beyond float32: the round does not
    count, x and c stay as they were and no client's c_i step is committed."""
    def big(message: Message, reply: Message) -> Message:
        config = message.content.config_records.get("config")
        if config and config.get("server-round") == 2 and "update" in reply.content:
            update = reply.content.array_records["update"]
            update["val"] = Array(np.full_like(update["val"].numpy(), 3e38))
        return reply

    before = {}

    def remember(rnd, grid, strategy):
        check_invariant(rnd, grid, strategy)
        before[rnd] = strategy.c.copy()

    scaffold = {"name": "scaffold", "audit": True, "global_lr": 10.0, "max_abs_value": 1e39}
    _grid, strategy, _, rows, _records = run(scenario(scaffold, rounds=3), tamper=big,
                                             on_round=remember)
    assert [row["round_counted"] for row in rows] == [1, 0, 1]
    np.testing.assert_array_equal(before[2], before[1])
    assert all(row["audit_control_gap"] < 1e-6 for row in rows)
    assert not any(r == 2 for r in strategy.accepted_round.values())


def test_a_round_below_min_train_replies_does_not_count():
    def reject_one(message: Message, reply: Message) -> Message:
        if "update" in reply.content and LocalGrid.partition_of(message) == 1:
            del reply.content.metric_records["metrics"]
        return reply

    _grid, strategy, _, rows, _records = run(scenario({"name": "scaffold", "audit": True,
                                             "fraction_train": 1.0, "min_train_replies": 6},
                                            rounds=2),
                                   tamper=reject_one, on_round=check_invariant)
    assert [row["round_counted"] for row in rows] == [0, 0]
    assert [row["clients_ok"] for row in rows] == [5, 5]
    assert not strategy.accepted_round and not np.abs(strategy.c).any()


def test_the_audit_goes_on_when_a_client_does_not_answer():
    def mute_audit(message: Message, reply: Message) -> Message:
        config = message.content.config_records.get("config")
        if config and config.get("query") == "control" and LocalGrid.partition_of(message) == 3:
            return Message(Error(code=0, reason="gone"), reply_to=message)
        return reply

    _grid, _strategy, _, rows, _records = run(scenario(SCAFCOM_TOPK, rounds=2), tamper=mute_audit)
    assert [row["audit_clients_answered"] for row in rows] == [5, 5]
    assert all("audit_control_gap" not in row for row in rows)


def test_uplink_is_the_compressed_payload():
    grid, _strategy, state, rows, records = run(scenario(SCAFCOM_TOPK))
    d = flatten(to_numpy(state.arrays)).size
    replies = [m for m in grid.received if "update" in m.content.array_records]
    sizes = [payload_bytes(to_numpy(m.content.array_records["update"])) for m in replies]
    records = [r for r in records if r.phase == "train"]
    assert [r.uplink_bytes for r in records] == sizes
    assert max(sizes) < 4 * d / 10  # 10% of the coordinates, float16 values + indices
    assert all(r.downlink_bytes == 2 * 4 * d for r in records)  # x and c, dense float32
    assert rows[0]["update_density"] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("variant", [
    {"name": "scallion", "alpha": 1.0, "compressor": {"name": "identity"}},
    {"name": "scafcom", "alpha": 1.0, "beta": 1.0, "compressor": {"name": "identity"}},
    {"name": "scafcom", "beta": 1.0, "compressor": {"name": "identity"},
     "momentum_in_local_steps": True},
])
def test_identity_variants_equal_scaffold_through_the_whole_stack(variant):
    reference = run(scenario({"name": "scaffold"}, rounds=3))
    other = run(scenario(variant, rounds=3))
    for key, value in to_numpy(reference[2].arrays).items():
        np.testing.assert_array_equal(to_numpy(other[2].arrays)[key], value)
    np.testing.assert_array_equal(reference[1].c, other[1].c)


def test_scaffold_sends_one_dense_vector_up():
    _grid, _strategy, state, _, records = run(scenario({"name": "scaffold"}, rounds=2))
    d = flatten(to_numpy(state.arrays)).size
    assert {r.uplink_bytes for r in records if r.phase == "train"} == {4 * d}


def test_gamma_is_global_lr_times_local_lr_times_k():
    scn = scenario({"name": "scaffold", "global_lr": 2.0})
    assert build_strategy(scn).gamma == pytest.approx(2.0 * 0.1 * 5)


def test_a_model_with_buffers_is_refused(monkeypatch):
    from torch import nn

    import strategies.scaffold as module

    monkeypatch.setattr(module, "scenario_model", lambda *a: nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="buffers"):
        build_strategy(scenario({"name": "scaffold"}))
