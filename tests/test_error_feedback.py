"""Compressed FedAvg with error feedback: the residual identity, the reduction to FedAvg,
and the two-phase commit of the residual through the whole stack (in-process grid)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsparse.compress import build_compressor
from fedsparse.compress.topk import TopKSpec
from fedsparse.error_feedback import ef_message, server_step
from fedsparse.scenario import parse_scenario
from strategies.records import to_numpy
from tests.conftest import digits_scenario
from tests.test_scaffold_flower import run


def test_residual_keeps_exactly_what_was_not_sent():
    rng = np.random.default_rng(0)
    compressor = build_compressor(TopKSpec(ratio=0.1))
    residual = np.zeros(200, np.float32)
    updates, sent = [], []
    for _ in range(20):
        u = rng.normal(size=200).astype(np.float32)
        message = ef_message(u, residual, compressor, rng)
        residual = message.residual
        updates.append(u)
        sent.append(message.sent)
        assert np.count_nonzero(message.sent) == 20
    # telescoping: everything computed is either sent or still in the residual
    np.testing.assert_allclose(np.sum(sent, axis=0) + residual, np.sum(updates, axis=0),
                               atol=1e-4)
    plain = ef_message(updates[0], residual, compressor, rng, error_feedback=False)
    assert not plain.residual.any()
    assert np.count_nonzero(plain.sent) == 20


def test_server_step_is_the_sample_weighted_mean():
    x = np.ones(3, np.float32)
    out = server_step(x, [np.array([1, 0, 0], np.float32), np.array([0, 3, 0], np.float32)],
                      [1, 3], global_lr=2.0)
    np.testing.assert_allclose(out, [1.5, 5.5, 1.0])


def ef_scenario(strategy: dict, rounds: int = 3):
    text = digits_scenario(strategy=strategy, run={"rounds": rounds, "eval_every": rounds})
    return parse_scenario(text.replace('program = "sgd"', 'program = "compressed_sgd"'))


@pytest.mark.usefixtures("flower_task")
def test_identity_compression_is_fedavg_through_the_whole_stack():
    ef = run(ef_scenario({"name": "fedavg_ef", "compressor": {"name": "identity"}}))
    reference = run(parse_scenario(digits_scenario(run={"rounds": 3, "eval_every": 3})))
    for key, value in to_numpy(reference[2].arrays).items():
        np.testing.assert_allclose(to_numpy(ef[2].arrays)[key], value, atol=1e-5)


@pytest.mark.usefixtures("flower_task")
def test_a_lost_message_leaves_the_residual_as_it_was():
    def reject_round_1(message, reply):
        config = message.content.config_records.get("config")
        if config and config.get("server-round") == 1 and "update" in reply.content:
            del reply.content.metric_records["metrics"]  # malformed -> rejected
        return reply

    grid, strategy, _, _, records = run(ef_scenario({"name": "fedavg_ef", "compressor":
                                            {"name": "topk", "ratio": 0.05}}, rounds=1),
                               tamper=reject_round_1)
    rejected = [r.partition_id for r in records if r.status == "rejected"]
    assert rejected and not strategy.accepted_round
    for pid in rejected:  # what it starts from next: the state before the lost round (none)
        assert grid.client_state(pid, strategy.accepted_round.get(pid, 0)) == {}
        # the round's own state, p - C(p), is on disk but holds only had it been counted
        pending = grid.client_state(pid, 1)["ef"]["residual"]
        assert 0 < np.count_nonzero(pending) < pending.size
