"""Compressed downlink: every client holds exactly the server's public model whatever rounds
it missed, payloads are validated, and bytes are what was sent."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsparse.compress import build_compressor, payload_bytes
from fedsparse.compress.identity import IdentitySpec
from fedsparse.compress.topk import TopKSpec
from fedsparse.downlink import PublicModel, apply_sync
from fedsparse.payload import PayloadError
from fedsparse.scenario import parse_scenario
from strategies.records import to_numpy
from tests.conftest import digits_scenario
from tests.test_scaffold_flower import run

D = 500


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=12),
       st.floats(0.01, 0.5))
def test_clients_hold_the_servers_public_model_bit_for_bit(participation, ratio):
    rng = np.random.default_rng(0)
    public = PublicModel(build_compressor(TopKSpec(ratio=ratio)))
    x = rng.normal(size=D).astype(np.float32)
    held: list[np.ndarray | None] = [None] * 4
    synced: list[int | None] = [None] * 4
    for server_round, who in enumerate(participation, start=1):
        x = x + rng.normal(scale=0.1, size=D).astype(np.float32)
        public.advance(server_round, x, rng)
        for client, takes_part in enumerate(who):
            if takes_part:
                payload = public.sync(synced[client])
                held[client] = apply_sync(held[client], payload, D)
                synced[client] = server_round
                assert np.array_equal(held[client], public.x_hat)
                assert payload_bytes(payload) <= 4 * D


def test_first_contact_is_dense_then_only_changes():
    public = PublicModel(build_compressor(TopKSpec(ratio=0.02)))
    rng = np.random.default_rng(1)
    x = np.ones(D, np.float32)
    public.advance(1, x, rng)
    assert set(public.sync(None)) == {"val"}
    public.advance(2, x + rng.normal(size=D).astype(np.float32), rng)
    payload = public.sync(1)
    assert payload["val"].size == 10 and payload_bytes(payload) < 4 * D / 10
    assert set(public.sync(None)) == {"val"}  # a newcomer still gets the whole model


def test_identity_downlink_tracks_the_model():
    public = PublicModel(build_compressor(IdentitySpec()))
    rng = np.random.default_rng(2)
    for r in range(1, 5):
        x = rng.normal(size=D).astype(np.float32)
        public.advance(r, x, rng)
        np.testing.assert_allclose(public.x_hat, x, atol=1e-6)


@pytest.mark.parametrize(("local", "payload", "reason"), [
    (None, {"idx.plain": np.array([1], np.uint16), "val": np.ones(1, np.float32)},
     "holds none"),
    (np.zeros(D, np.float32), {"idx.plain": np.array([600], np.uint16),
                               "val": np.ones(1, np.float32)}, "out of range"),
    (np.zeros(D, np.float32), {"idx.plain": np.array([1, 2], np.uint16),
                               "val": np.ones(1, np.float32)}, "length 1, expected 2"),
    (None, {"val": np.ones(D - 1, np.float32)}, f"expected {D}"),
    (None, {"val": np.full(D, np.nan, np.float32)}, "NaN"),
])
def test_bad_sync_payloads_are_rejected(local, payload, reason):
    with pytest.raises(PayloadError, match=reason):
        apply_sync(local, payload, D)


@pytest.mark.usefixtures("flower_task")
def test_compressed_downlink_through_the_whole_stack():
    text = digits_scenario(run={"rounds": 4, "eval_every": 4}, strategy={
        "fraction_train": 0.5, "downlink": {"name": "topk", "ratio": 0.05}})
    grid, strategy, state, rows, records = run(parse_scenario(text))
    d = sum(a.size for a in to_numpy(state.arrays).values())
    train = [r for r in records if r.phase == "train"]
    first_contact = {}
    for record in train:
        first_contact.setdefault(record.partition_id, record.round)
    for record in train:
        if record.round == first_contact[record.partition_id]:
            assert record.downlink_bytes == 4 * d  # the whole public model, once
        else:
            assert record.downlink_bytes < 4 * d / 2  # only what changed since
    for pid, synced_round in strategy.accepted_round.items():  # clients hold the public model
        held = grid.client_state(pid, synced_round)["public-model"]["x_hat"]
        if synced_round == 4:
            assert np.array_equal(held, strategy.public.x_hat)
    evals = [r for r in records if r.phase == "evaluate"]
    assert {r.downlink_bytes for r in evals} == {4 * d}  # evaluation gets the dense model
    assert rows[-1]["accuracy"] > 0.5
