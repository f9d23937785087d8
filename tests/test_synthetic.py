"""FedProx's Synthetic(alpha, beta): the generator's law, laziness, determinism across
processes, the splits, the server's test set and the scenario keys (no Flower)."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsparse.data import (
    available,
    client_data,
    client_indices,
    dataset_shape,
    held_out_set,
    load_dataset,
    partition,
    synthetic,
)
from fedsparse.data.partition import LazySplits, check_partition, local_test_size
from fedsparse.models import build_model, scenario_model
from fedsparse.models.mlp import MLPParams
from fedsparse.scenario import DataSpec, ScenarioError, SyntheticSpec, load_scenario
from tests.conftest import DATA, REPO

SCENARIO = REPO / "scenarios" / "synthetic.toml"


def spec(num_clients: int = 1000, test_fraction: float = 0.2, **keys) -> DataSpec:
    table = {"alpha": 1.0, "beta": 1.0, **keys}
    return DataSpec(dataset="synthetic", partition="natural", num_clients=num_clients,
                    test_fraction=test_fraction, synthetic=SyntheticSpec(**table))


def digest(spec: DataSpec, seed: int, pid: int) -> str:
    d = client_data(spec, seed, pid)
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in
                                   (d.x_train, d.y_train, d.x_test, d.y_test))).hexdigest()


def test_a_fresh_process_serving_another_order_gets_the_same_clients():
    s = spec()
    here = [digest(s, 7, 3), digest(s, 7, 5)]  # 3 then 5 here, 5 then 3 there
    code = ("from tests.test_synthetic import digest, spec; "
            "s = spec(); b = digest(s, 7, 5); a = digest(s, 7, 3); print(a, b)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == here


def test_clients_and_seeds_differ():
    s = spec()
    a, b = synthetic.client_model(s.synthetic, 0, 3), synthetic.client_model(s.synthetic, 0, 4)
    assert not np.array_equal(a.W, b.W) and not np.array_equal(a.v, b.v)
    assert len({digest(s, 0, 3), digest(s, 0, 4), digest(s, 1, 3)}) == 3


def test_serving_a_client_generates_no_other(monkeypatch):
    """One client of a 10^7-client federation: only its own streams are drawn."""
    drawn = []
    real = synthetic.client_rng

    def recording(seed: int, pid: int, stream: int) -> np.random.Generator:
        drawn.append((pid, stream))
        return real(seed, pid, stream)

    monkeypatch.setattr(synthetic, "client_rng", recording)
    monkeypatch.setattr(partition, "_cached_partitioner", None)  # never for synthetic
    s = spec(num_clients=10_000_000)
    last = 9_999_999
    client_indices(s, 0, last)
    assert drawn == [(last, synthetic.SIZE)]  # the size alone: what example_bound asks
    drawn.clear()
    data = client_data(s, 0, last)
    assert {pid for pid, _ in drawn} == {last}
    assert {stream for _, stream in drawn} == {synthetic.SIZE, synthetic.MODEL,
                                               synthetic.FEATURES}
    assert len(data.x_train) + len(data.x_test) == synthetic.client_size(s.synthetic, 0, last)


def test_labels_are_the_argmax_of_the_clients_own_softmax_regression():
    s = spec(dimension=60, classes=10)
    for pid in (0, 11, 42):
        x, y = synthetic.client_examples(s.synthetic, 5, pid)
        model = synthetic.client_model(s.synthetic, 5, pid)
        assert x.shape == (synthetic.client_size(s.synthetic, 5, pid), 60)
        assert model.W.shape == (10, 60) and model.b.shape == (10,)
        logits = x.astype(np.float64) @ model.W.T + model.b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        assert np.array_equal(np.argmax(p, axis=1), y)
    other = synthetic.client_model(s.synthetic, 5, 43)
    assert not np.array_equal(synthetic.labels(other, x), y)  # another client's model differs


def test_alpha_and_beta_zero_give_every_client_zero_means():
    s = spec(alpha=0.0, beta=0.0)
    models = [synthetic.client_model(s.synthetic, 0, pid) for pid in range(200)]
    assert all(m.u == 0.0 and m.B == 0.0 for m in models)
    w = np.stack([m.W for m in models])  # 200 x 10 x 60 draws of N(0, 1)
    assert abs(w.mean()) < 5 / math.sqrt(w.size) and abs(w.std() - 1) < 0.01
    v = np.stack([m.v for m in models])
    assert abs(v.mean()) < 5 / math.sqrt(v.size)


def test_alpha_and_beta_are_standard_deviations_as_in_the_release():
    """u_k ~ normal(0, alpha) with numpy's scale: alpha = 4 gives a spread of 4, not 2."""
    s = spec(alpha=4.0, beta=0.25)
    models = [synthetic.client_model(s.synthetic, 0, pid) for pid in range(4000)]
    u = np.array([m.u for m in models])
    big_b = np.array([m.B for m in models])
    # the sample std of 4000 normal draws is within 5% of sigma with overwhelming probability
    assert abs(u.std() / 4.0 - 1) < 0.05 and abs(big_b.std() / 0.25 - 1) < 0.05
    w_means = np.array([m.W.mean() for m in models])  # W_k's entries are centred on u_k
    assert np.abs(w_means - u).max() < 6 / math.sqrt(600)


def test_sizes_follow_the_lognormal_law_above_the_minimum():
    s = spec(size_max=10**9)
    n = 20_000
    sizes = np.array([synthetic.client_size(s.synthetic, 3, pid) for pid in range(n)])
    assert sizes.min() >= 50
    assert abs(np.median(sizes) - (math.floor(math.exp(4)) + 50)) <= 3
    for t in (5, 54, 300, 3000):  # P(floor(X) <= t) = P(X < t + 1), X ~ LogNormal(4, 2)
        expected = 0.5 * (1 + math.erf((math.log(t + 1) - 4) / (2 * math.sqrt(2))))
        observed = np.mean(sizes - 50 <= t)
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / n), t


def test_sizes_are_capped_at_size_max_even_when_the_draw_overflows():
    capped = [synthetic.client_size(spec(size_max=60).synthetic, 0, pid) for pid in range(300)]
    assert min(capped) >= 50 and max(capped) == 60 and capped.count(60) > 100
    huge = spec(size_log_mean=1000.0, size_max=12_345).synthetic  # exp(1000) is inf
    assert synthetic.client_size(huge, 0, 0) == 12_345


def test_features_have_mean_v_and_the_decaying_diagonal_covariance():
    s = spec(size_min=40_000, size_max=40_000)
    x, _ = synthetic.client_examples(s.synthetic, 0, 1)
    v = synthetic.client_model(s.synthetic, 0, 1).v
    centred = x.astype(np.float64) - v
    variances = (centred ** 2).mean(axis=0)
    sigma = np.arange(1, 61) ** -1.2
    # relative standard error of a variance estimate: sqrt(2 / n) = 0.7%
    assert np.abs(variances / sigma - 1).max() < 0.04
    assert np.abs(centred.mean(axis=0) / np.sqrt(sigma)).max() < 6 / math.sqrt(len(x))
    covariance = centred.T @ centred / len(x)
    off = covariance[~np.eye(60, dtype=bool)] / np.sqrt(np.outer(sigma, sigma))[
        ~np.eye(60, dtype=bool)]
    assert np.abs(off).max() < 0.03  # uncorrelated features


@pytest.mark.parametrize("test_fraction", [0.1, 0.2, 0.35])
def test_local_splits_are_the_rounded_test_fraction_of_each_client(test_fraction):
    s = spec(test_fraction=test_fraction)
    for pid in range(20):
        n = synthetic.client_size(s.synthetic, 2, pid)
        idx = client_indices(s, 2, pid)
        assert idx.size("evaluate") == round(test_fraction * n)
        assert idx.size("train") == n - round(test_fraction * n) >= 1
        x, y = synthetic.client_examples(s.synthetic, 2, pid)
        d = client_data(s, 2, pid)
        assert torch.equal(torch.cat([d.x_train, d.x_test]), torch.from_numpy(x))
        assert torch.equal(torch.cat([d.y_train, d.y_test]), torch.from_numpy(y))
        assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64


def test_the_server_test_set_pools_exactly_the_sampled_clients_test_splits():
    s = spec(num_clients=5000, central_test_clients=40)
    chosen = synthetic.central_clients(s.synthetic, s.num_clients, 9)
    assert len(set(chosen.tolist())) == 40 and list(chosen) == sorted(chosen)
    assert chosen.min() >= 0 and chosen.max() < 5000
    assert np.array_equal(chosen, synthetic.central_clients(s.synthetic, 5000, 9))
    assert not np.array_equal(chosen, synthetic.central_clients(s.synthetic, 5000, 10))
    x, y = held_out_set(s, 9)
    parts = [client_data(s, 9, int(pid)) for pid in chosen]
    assert torch.equal(x, torch.cat([p.x_test for p in parts]))
    assert torch.equal(y, torch.cat([p.y_test for p in parts]))


def test_fewer_clients_than_central_test_clients_pools_them_all():
    s = spec(num_clients=30)  # central_test_clients = 100 by default
    assert synthetic.central_clients(s.synthetic, 30, 0).tolist() == list(range(30))
    x, _ = held_out_set(s, 0)
    assert len(x) == sum(client_indices(s, 0, pid).size("evaluate") for pid in range(30))


def test_check_partition_of_a_million_clients_generates_nothing(monkeypatch):
    def refuse(*_):
        raise AssertionError("generated data")

    monkeypatch.setattr(synthetic, "client_rng", refuse)
    monkeypatch.setattr(partition, "_cached_partitioner", refuse)
    splits = check_partition(spec(num_clients=1_000_000), seed=0)
    assert isinstance(splits, LazySplits) and len(splits) == 1_000_000
    monkeypatch.undo()
    assert np.array_equal(splits[17].test, client_indices(spec(num_clients=1_000_000), 0,
                                                          17).test)
    with pytest.raises(IndexError):
        splits[1_000_000]


def test_neither_split_shrinks_as_a_client_grows():
    """Why checking the smallest client (size_min) is a check of every client."""
    for fraction in (0.01, 0.1, 0.25, 0.5, 0.55, 0.9, 0.999):
        tests = np.array([local_test_size(n, fraction) for n in range(1, 3000)])
        trains = np.arange(1, 3000) - tests
        assert (np.diff(tests) >= 0).all() and (np.diff(trains) >= 0).all()


@pytest.mark.parametrize(("keys", "line"), [
    ({"test_fraction": 0.0}, "data.test_fraction = 0.0: leaves a client of data.synthetic."
     "size_min = 50 examples no local test example, and the server's test set is made of the "
     "clients' test splits (allowed: above 0.01)"),
    ({"test_fraction": 0.5, "size_min": 1}, "data.test_fraction = 0.5: leaves a client of "
     "data.synthetic.size_min = 1 examples no local test example, and the server's test set is "
     "made of the clients' test splits (allowed: above 0.5)"),
    ({"test_fraction": 0.6, "size_min": 1}, "data.test_fraction = 0.6: leaves a client of "
     "data.synthetic.size_min = 1 examples no local training example (allowed: below 0.5)"),
])
def test_check_partition_refuses_splits_that_leave_the_smallest_client_bare(keys, line):
    test_fraction = keys.pop("test_fraction")
    with pytest.raises(ScenarioError) as info:
        check_partition(spec(test_fraction=test_fraction, **keys), seed=0, source="s.toml")
    assert info.value.problems == [line]


def test_the_shipped_scenario_is_softmax_regression_sized_by_the_data():
    scenario = load_scenario(SCENARIO)
    assert scenario.data.num_clients == 1000 and scenario.model.hidden == []
    model = scenario_model(scenario)
    [linear] = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert (linear.in_features, linear.out_features) == (60, 10)
    small = load_scenario(SCENARIO, ["data.synthetic.dimension=7", "data.synthetic.classes=3",
                                     "model.hidden=[16]"])
    layers = [m for m in scenario_model(small).modules() if isinstance(m, torch.nn.Linear)]
    assert (layers[0].in_features, layers[-1].out_features) == (7, 3)
    assert dataset_shape(small.data).input_shape == (7,)
    assert len(check_partition(scenario.data, scenario.seed)) == 1000


def test_synthetic_has_no_files_to_load():
    assert available("synthetic")
    with pytest.raises(ValueError, match=r"generated per client .*dataset_shape"):
        load_dataset("synthetic")


def test_continual_clients_take_the_classes_from_the_synthetic_table():
    from clients.programs.continual import ContinualProgram

    scn = load_scenario(DATA / "continual_digits.toml", [
        "data.dataset=synthetic", "data.partition=natural", "data.synthetic.alpha=0.0",
        "data.synthetic.beta=0.0", "data.synthetic.classes=6", "continual.num_tasks=3",
        "run.rounds=9"])
    stream = ContinualProgram(scn, 1, state=None).stream
    assert sorted(c for task in stream.tasks for c in task) == list(range(6))


@pytest.mark.parametrize(("overrides", "line"), [
    (["data.partition=iid"], "data: data.partition = 'iid': dataset = 'synthetic' generates "
     "every client's own data, so each client is its own natural group (allowed: 'natural')"),
    (["data.synthetic.alpha=-1.0"],
     "data.synthetic.alpha = -1.0: Input should be greater than or equal to 0"),
    (["data.synthetic.size_max=10"], "data.synthetic: data.synthetic.size_max = 10: below "
     "data.synthetic.size_min = 50 (allowed: at least 50)"),
    (["data.synthetic.classes=1"], "data.synthetic.classes = 1: Input should be greater than "
     "or equal to 2"),
    (["data.num_clients=10000001"], "data.num_clients = 10000001: Input should be less than or "
     "equal to 10000000"),
    (["model.name=cnn", "model.hidden=[8]"], "<scenario>: model.name = 'cnn' needs images, and "
     "data.dataset = 'synthetic' gives vectors of data.synthetic.dimension features (allowed: "
     "model.name = 'mlp')"),
])
def test_bad_synthetic_scenarios_are_refused(overrides, line):
    with pytest.raises(ScenarioError) as info:
        load_scenario(SCENARIO, overrides)
    assert line in info.value.problems


def test_the_synthetic_table_goes_with_the_synthetic_dataset_only():
    with pytest.raises(ScenarioError) as info:
        load_scenario(DATA / "digits.toml", ["data.synthetic.alpha=1.0",
                                             "data.synthetic.beta=1.0"])
    assert info.value.problems == [
        "data: data.synthetic only applies to dataset = 'synthetic', not 'digits'"]
    with pytest.raises(ScenarioError) as info:
        load_scenario(DATA / "digits.toml", ["data.dataset=synthetic", "data.partition=natural"],
                      unset=["data.alpha"])
    assert info.value.problems == ["data: dataset = 'synthetic' needs a [data.synthetic] table "
                                   "with alpha and beta (FedProx's Synthetic(alpha, beta))"]
    with pytest.raises(ScenarioError) as info:
        load_scenario(SCENARIO, ["data.synthetic.bogus=1"])
    [line] = info.value.problems
    assert line.startswith("data.synthetic.bogus: unknown key (allowed in [data.synthetic]: "
                           "alpha, beta, dimension, classes, ")
    with pytest.raises(ScenarioError) as info:
        load_scenario(DATA / "digits.toml", ["data.partition=natural"], unset=["data.alpha"])
    assert info.value.problems == ["data: partition = 'natural' needs a dataset with natural "
                                   "groups (chatterbot, synthetic), not 'digits'"]


def test_ten_million_clients_validate():
    scenario = load_scenario(SCENARIO, ["data.num_clients=10000000"])
    assert scenario.data.num_clients == 10_000_000


def test_centralised_softmax_regression_learns_synthetic_0_0():
    """Softmax regression on the pooled training data of 20 Synthetic(0, 0) clients beats the
    majority class of their pooled test splits by far."""
    s = spec(num_clients=20, alpha=0.0, beta=0.0)
    parts = [client_data(s, 0, pid) for pid in range(20)]
    x, y = torch.cat([p.x_train for p in parts]), torch.cat([p.y_train for p in parts])
    x_test, y_test = torch.cat([p.x_test for p in parts]), torch.cat([p.y_test for p in parts])
    majority = np.bincount(y_test.numpy()).max() / len(y_test)
    torch.manual_seed(0)
    model = build_model(MLPParams(hidden=[]), dataset_shape(s).input_shape, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 60 x 10 model: more threads only contend
    try:
        for _ in range(3):
            for batch in torch.randperm(len(x)).split(32):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).double().mean().item()
    assert majority < 0.8 and accuracy > 0.9
