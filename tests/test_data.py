"""Datasets (real files, no network) and partitions (sizes, label skew, determinism)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsparse.cli import main
from fedsparse.data import (
    available,
    client_data,
    client_indices,
    held_out_set,
    load_dataset,
    partition,
    partition_indices,
)
from fedsparse.data.partition import check_partition, local_split
from fedsparse.scenario import DataSpec, ScenarioError, load_scenario
from tests.conftest import DATA, shipped_scenarios

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_is_the_original_60k_10k():
    data = load_dataset("mnist")
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    assert data.x_train.dtype == np.uint8
    assert np.bincount(data.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(data.y_test).tolist() == MNIST_TEST_COUNTS
    x = data.features(data.x_train[:1000])
    assert x.shape == (1000, 1, 28, 28) and abs(float(x.mean())) < 0.1


@pytest.mark.parametrize("name", ["mnist", "digits"])  # uint8 and float32 pixels
def test_features_are_the_normalised_pixels_and_leave_the_dataset_as_it_was(name):
    data = load_dataset(name)
    raw = data.x_train[:300].copy()
    expected = (torch.from_numpy(raw).to(torch.float32) / data.scale - data.mean) / data.std
    assert torch.equal(data.features(data.x_train[:300]), expected.unsqueeze(1))
    assert np.array_equal(data.x_train[:300], raw)
    assert torch.equal(data.features(data.x_train[:300]), expected.unsqueeze(1))  # again


@pytest.mark.skipif(not available("fashion_mnist"), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_when_present():
    data = load_dataset("fashion_mnist")
    assert data.x_train.shape == (60000, 28, 28)
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10


def test_digits_split_is_fixed_and_stratified():
    data = load_dataset("digits")
    assert len(data.x_train) + len(data.x_test) == 1797 and len(data.x_test) == 360
    assert np.bincount(data.y_test).min() >= 35
    x, y = held_out_set(DataSpec(dataset="digits"), seed=0)
    assert tuple(x.shape) == (360, 1, 8, 8) and y.dtype.is_floating_point is False


def labels(name: str) -> np.ndarray:
    return load_dataset(name).y_train


def check_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == len(np.unique(merged)) == n  # disjoint, and nothing dropped


def test_iid_equal_sizes_and_balanced_labels():
    spec = DataSpec(dataset="mnist", num_clients=100, partition="iid")
    parts = partition_indices(labels("mnist"), spec, seed=0)
    assert {len(p) for p in parts} == {600}
    check_disjoint_cover(parts, 60000)
    assert all(len(np.unique(labels("mnist")[p])) == 10 for p in parts)


def label_entropy(parts: list[np.ndarray], y: np.ndarray) -> float:
    """Mean entropy (nats) of the clients' label distributions."""
    entropies = []
    for p in parts:
        q = np.bincount(y[p], minlength=10) / len(p)
        entropies.append(-(q[q > 0] * np.log(q[q > 0])).sum())
    return float(np.mean(entropies))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = labels("mnist")
    entropy = {}
    for alpha in (100.0, 0.5, 0.1):
        spec = DataSpec(dataset="mnist", num_clients=20, partition="dirichlet", alpha=alpha)
        parts = partition_indices(y, spec, seed=0)
        check_disjoint_cover(parts, 60000)
        assert min(len(p) for p in parts) >= spec.min_partition_size
        entropy[alpha] = label_entropy(parts, y)
    assert entropy[100.0] > 2.2  # close to log(10) = 2.30: nearly IID
    assert entropy[100.0] > entropy[0.5] > entropy[0.1]
    assert entropy[0.1] < 1.2


def test_shards_are_label_sorted_chunks_k_per_client():
    """McMahan et al.'s shards: a shard of label-sorted data may straddle two labels."""
    y = labels("mnist")
    spec = DataSpec(dataset="mnist", num_clients=100, partition="shards", shards_per_client=2)
    parts = partition_indices(y, spec, seed=0)
    assert {len(p) for p in parts} == {600}
    check_disjoint_cover(parts, 60000)
    classes = np.array([len(np.unique(y[p])) for p in parts])
    assert classes.max() <= 4  # 2 shards, each within at most 2 labels
    assert (classes <= 2).mean() >= 0.9
    top2 = [np.sort(np.bincount(y[p], minlength=10))[-2:].sum() / len(p) for p in parts]
    assert np.mean(top2) > 0.98


def test_pathological_gives_exactly_k_classes():
    y = labels("digits")
    spec = DataSpec(dataset="digits", num_clients=10, partition="pathological",
                    classes_per_client=3)
    parts = partition_indices(y, spec, seed=0)
    check_disjoint_cover(parts, len(y))
    assert [len(np.unique(y[p])) for p in parts] == [3] * 10


@pytest.mark.parametrize("spec", [
    DataSpec(dataset="digits", num_clients=8, partition="iid"),
    DataSpec(dataset="digits", num_clients=8, partition="dirichlet", alpha=0.3),
    DataSpec(dataset="digits", num_clients=8, partition="shards", shards_per_client=2),
])
def test_same_seed_same_partition_other_seed_other_partition(spec):
    y = labels("digits")
    a, b = partition_indices(y, spec, seed=1), partition_indices(y, spec, seed=1)
    c = partition_indices(y, spec, seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_local_split_is_disjoint_seeded_and_sized():
    part = np.arange(100, 150)
    split = local_split(part, 0.2, seed=3, partition_id=4)
    assert len(split.test) == 10 and len(split.train) == 40
    assert set(split.train) | set(split.test) == set(part)
    assert not set(split.train) & set(split.test)
    again = local_split(part, 0.2, seed=3, partition_id=4)
    assert np.array_equal(split.test, again.test)
    assert not np.array_equal(split.test, local_split(part, 0.2, seed=3, partition_id=5).test)


def test_client_view_matches_the_full_partition():
    spec = DataSpec(dataset="digits", num_clients=5, partition="dirichlet", alpha=0.5)
    parts = partition_indices(labels("digits"), spec, seed=9)
    for pid in range(5):
        idx = client_indices(spec, 9, pid)
        assert np.array_equal(np.sort(np.concatenate([idx.train, idx.test])), parts[pid])
    data = client_data(spec, 9, 2)
    assert len(data.x_train) == len(client_indices(spec, 9, 2).train)
    with pytest.raises(ValueError, match="partition-id 5 out of range"):
        client_indices(spec, 9, 5)


@pytest.mark.parametrize("knobs", [{"partition": "dirichlet", "alpha": 0.5},
                                   {"partition": "iid"},
                                   {"partition": "shards", "shards_per_client": 2}])
def test_a_partition_read_in_bulk_is_the_rows_one_by_one(knobs):
    spec = DataSpec(dataset="digits", num_clients=7, **knobs)
    partitioner = partition._assigned_partitioner(labels("digits"), spec, seed=4)
    for pid in range(7):
        rows = [row["index"] for row in partitioner.load_partition(pid)]
        assert np.array_equal(partition._load(partitioner, pid), np.sort(rows))


def test_a_split_that_needs_resampling_is_the_same_whichever_client_comes_first(monkeypatch):
    """DirichletPartitioner makes 10 draws per call and keeps its generator when they all
    fail; for this seed the first three calls fail. Every process must still hold the one
    partition that ``partition_indices`` gives, whichever client it serves first."""
    spec = DataSpec(dataset="digits", num_clients=10, partition="dirichlet", alpha=0.1,
                    min_partition_size=50)
    y = labels("digits")
    with monkeypatch.context() as m:
        m.setattr(partition, "RESAMPLING_CALLS", 2)
        with pytest.raises(ValueError, match=r"data\.min_partition_size=50, 20 draws"):
            partition_indices(y, spec, seed=23)
    parts = partition_indices(y, spec, seed=23)
    check_disjoint_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 50
    for order in (range(10), reversed(range(10))):  # a fresh process serving these clients
        partition._cached_partitioner.cache_clear()
        partition._partitioned_indices.cache_clear()
        for pid in order:
            idx = client_indices(spec, 23, pid)
            assert np.array_equal(np.sort(np.concatenate([idx.train, idx.test])), parts[pid])


def test_impossible_split_names_the_keys():
    spec = DataSpec(dataset="digits", num_clients=500, partition="dirichlet", alpha=0.1,
                    min_partition_size=10)
    with pytest.raises(ValueError, match=r"data\.num_clients=500"):
        partition_indices(labels("digits"), spec, seed=0)


def test_check_partition_gives_the_clients_own_splits():
    spec = DataSpec(dataset="digits", num_clients=6, partition="dirichlet", alpha=1.0,
                    min_partition_size=20)
    splits = check_partition(spec, seed=7)
    for pid, split in enumerate(splits):
        own = client_indices(spec, 7, pid)
        assert np.array_equal(split.train, own.train) and np.array_equal(split.test, own.test)
    assert min(split.train.size for split in splits) >= 16  # 20 examples, a fifth for testing


@pytest.mark.slow
def test_every_shipped_scenario_can_be_split():
    """What ``fedsparse run`` checks first, for each distinct split of the shipped files."""
    splits = {}
    for path in shipped_scenarios():
        scenario = load_scenario(path)
        splits.setdefault((scenario.data, scenario.seed), path)
    for (spec, seed), path in splits.items():
        if available(spec.dataset):
            assert min(s.train.size for s in check_partition(spec, seed, str(path))) >= 1


DIGITS_TRAIN = "the 1437 training examples of 'digits'"


@pytest.mark.parametrize(("overrides", "line"), [
    (["data.num_clients=2000"],
     f"data.num_clients = 2000: more clients than {DIGITS_TRAIN} (allowed: at most 1437)"),
    (["data.num_clients=100", "data.min_partition_size=20"],
     f"data.min_partition_size = 20: 100 clients x 20 = 2000 examples, more than "
     f"{DIGITS_TRAIN} (allowed: at most 14)"),
    (["data.num_clients=100", "data.min_partition_size=14"],
     "cannot split 1437 examples into data.num_clients=100 with data.partition='dirichlet' "
     "(data.alpha=1.0, data.min_partition_size=14, 100 draws): The max number of attempts (10) "
     "was reached. Please update the values of alpha and try again."),
    (["data.num_clients=1000", "data.min_partition_size=0"],
     "data.partition = 'dirichlet': leaves 204 of the 1000 clients with no example (client 0); "
     "raise data.min_partition_size (now 0)"),
    (["data.partition=shards", "data.shards_per_client=2", "data.num_clients=1000"],
     f"data.shards_per_client = 2: 1000 clients x 2 = 2000 shards, more than {DIGITS_TRAIN} "
     f"(allowed: at most 1)"),
    (["data.partition=pathological", "data.classes_per_client=11"],
     "data.classes_per_client = 11: more than the 10 classes of 'digits' (allowed: 1 to 10)"),
    (["data.partition=iid", "data.num_clients=1437", "data.test_fraction=0.6"],
     "data.test_fraction = 0.6: leaves 1437 of the 1437 clients with no local training example "
     "(the smallest partition is 1; allowed: below 0.5)"),
])
def test_a_split_that_cannot_be_made_is_refused_by_validate(overrides, line, capsys):
    assert main(["validate", str(DATA / "digits.toml"),
                 *(arg for o in overrides for arg in ("--set", o))]) == 2
    err = capsys.readouterr().err
    assert [p.removeprefix("  - ") for p in err.splitlines() if p.startswith("  - ")] == [line]


def test_a_partitioner_that_cannot_assign_the_classes_names_the_keys():
    spec = DataSpec(dataset="digits", num_clients=1000, partition="pathological",
                    classes_per_client=10)
    with pytest.raises(ScenarioError) as info:
        check_partition(spec, seed=0, source="arm.toml")
    assert info.value.source == "arm.toml"
    [line] = info.value.problems
    assert line.startswith("cannot split 1437 examples into data.num_clients=1000 with "
                           "data.partition='pathological' (data.classes_per_client=10): Label: ")


@pytest.mark.parametrize(("spec", "ending"), [
    (DataSpec(dataset="digits", num_clients=1000, partition="shards", shards_per_client=2),
     " (data.shards_per_client=2): division by zero"),
    (DataSpec(dataset="digits", num_clients=2000, partition="iid"),
     ": Index 1437 out of range for dataset of size 1437."),
])
def test_a_partitioner_crash_becomes_one_line_naming_the_keys(spec, ending, monkeypatch):
    """What the size checks refuse first makes flwr-datasets' partitioners crash."""
    monkeypatch.setattr(partition, "_impossible_sizes", lambda *_: [])
    with pytest.raises(ScenarioError) as info:
        check_partition(spec, seed=0)
    assert info.value.problems == [
        f"cannot split 1437 examples into data.num_clients={spec.num_clients} with "
        f"data.partition={spec.partition!r}{ending}"]


def test_run_and_compare_check_the_split_before_anything_starts(workdir, capsys):
    bad = ["--set", "data.num_clients=2000"]
    assert main(["run", str(DATA / "digits.toml"), *bad]) == 2
    assert "data.num_clients = 2000: more clients" in capsys.readouterr().err
    (workdir / "fine.toml").write_text((DATA / "digits.toml").read_text())
    (workdir / "few.toml").write_text((DATA / "digits.toml").read_text().replace(
        "num_clients = 6", "num_clients = 2000"))
    assert main(["compare", "fine.toml", "few.toml"]) == 2
    err = capsys.readouterr().err
    assert "invalid scenario few.toml:\n  - data.num_clients = 2000: more clients" in err
    # no run; only the split of the valid file, kept for its processes (split_store.py)
    assert sorted(p.name for p in workdir.iterdir()) == [".fedsparse", "few.toml", "fine.toml"]
    assert [p.name for p in (workdir / ".fedsparse").iterdir()] == ["splits"]
