"""The per-partition client state store: round trips, the two-phase commit of every piece of
client state, what is kept on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsparse.client_state import ClientState, StateMissing, StateStore


def components(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {"control": {"c_i": rng.normal(size=7).astype(np.float32),
                        "v_i": rng.normal(size=7).astype(np.float32)},
            "pfedgate-momentum": {"model/0.weight": rng.normal(size=(2, 3)),
                                  "gating/1.bias": rng.normal(size=2)},
            "data-removal": {"task": np.array([3]), "kept": np.arange(5, dtype=np.int64)}}


def train(store: StateStore, commit: int, server_round: int, seed: int) -> ClientState:
    state = ClientState(store, commit, server_round)
    for name, arrays in components(seed).items():
        state.put(name, arrays)
    state.save()
    return state


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key])
            assert a[name][key].dtype == b[name][key].dtype


def test_a_saved_state_reads_back_exactly(tmp_path: Path):
    store = StateStore(tmp_path, "run", 4)
    train(store, commit=0, server_round=3, seed=1)
    loaded, based_on = store.load(3)
    assert_same(loaded, components(1))
    assert based_on == 0
    assert store.directory == tmp_path / "run" / "4"


def test_a_client_starts_from_the_state_of_its_commit_round(tmp_path: Path):
    store = StateStore(tmp_path, "run", 0)
    train(store, commit=0, server_round=1, seed=1)  # counted
    train(store, commit=1, server_round=2, seed=2)  # lost: the server never counted it
    state = ClientState(store, commit_round=1, server_round=3)
    assert_same(state.committed, components(1))  # round 2 never happened for this client
    assert state.get("nothing") == {}
    assert ClientState(store, 0, 3).committed == {}  # never counted: no state


def test_staged_components_go_over_the_committed_ones(tmp_path: Path):
    store = StateStore(tmp_path, "run", 0)
    train(store, commit=0, server_round=1, seed=1)
    state = ClientState(store, commit_round=1, server_round=2)
    state.put("control", {"c_i": np.ones(7, np.float32), "v_i": np.zeros(7, np.float32)})
    np.testing.assert_array_equal(state.get("control")["c_i"], np.ones(7))
    state.save()
    saved, based_on = store.load(2)
    np.testing.assert_array_equal(saved["control"]["c_i"], np.ones(7))
    assert_same({"pfedgate-momentum": saved["pfedgate-momentum"]},
                {"pfedgate-momentum": components(1)["pfedgate-momentum"]})  # carried over
    assert based_on == 1


def test_the_latest_two_committed_rounds_and_the_one_in_training_are_kept(tmp_path: Path):
    store = StateStore(tmp_path, "run", 0)
    train(store, 0, 1, seed=1)
    train(store, 1, 2, seed=2)
    assert store.rounds() == [1, 2]
    train(store, 1, 3, seed=3)  # round 2 was not counted: it is gone for good
    assert store.rounds() == [1, 3]
    train(store, 3, 5, seed=5)  # round 3 counted
    assert store.rounds() == [1, 3, 5]  # 3 (latest committed), 1 (the one before), 5
    train(store, 5, 6, seed=6)
    assert store.rounds() == [3, 5, 6]


def test_a_missing_or_damaged_committed_state_is_an_error_not_a_fresh_start(tmp_path: Path):
    store = StateStore(tmp_path, "run", 0)
    train(store, 0, 1, seed=1)
    with pytest.raises(StateMissing, match="no client state for round 2"):
        store.load(2)
    store.path(1).write_bytes(b"torn")
    with pytest.raises(StateMissing, match="damaged"):
        ClientState(store, 1, 2).get("control")


def test_a_stateless_client_writes_nothing(tmp_path: Path):
    store = StateStore(tmp_path, "run", 0)
    ClientState(store, 0, 1).save()
    assert not store.directory.exists() and store.load(1) == ({}, 0)
