"""Split a dataset over clients the way FL papers do, with flwr-datasets' partitioners.

- ``iid``: a seeded shuffle cut into equal parts (``IidPartitioner`` on shuffled data).
- ``dirichlet``: label skew, client class proportions ~ Dir(alpha) (Hsu et al. 2019;
  ``DirichletPartitioner``, resampled until every client has ``min_partition_size``).
- ``shards``: sort by label, cut into equal shards, deal ``shards_per_client`` to each client
  (McMahan et al. 2017; ``ShardPartitioner``), so a client sees at most that many classes.
- ``pathological``: exactly ``classes_per_client`` classes per client
  (``PathologicalPartitioner``).
- ``natural``: one client per natural group of the dataset, e.g. the language of a text
  (``NaturalIdPartitioner``; groups in sorted order).

Each client's partition is then split into a local train and a local test part. The same
spec and seed always give the same partition.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedsparse.scenario import DataSpec


@dataclass(frozen=True)
class ClientIndices:
    """Indices into the dataset's training arrays for one client."""

    train: np.ndarray
    test: np.ndarray


def _partitioner(spec: DataSpec, seed: int):  # -> flwr_datasets.partitioner.Partitioner
    from flwr_datasets import partitioner as fp

    n = spec.num_clients
    if spec.partition == "iid":
        return fp.IidPartitioner(num_partitions=n)
    if spec.partition == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=spec.alpha,
            min_partition_size=spec.min_partition_size, self_balancing=False, seed=seed,
        )
    if spec.partition == "natural":
        return fp.NaturalIdPartitioner(partition_by="group")
    if spec.partition == "shards":
        return fp.ShardPartitioner(
            num_partitions=n, partition_by="label",
            num_shards_per_partition=spec.shards_per_client, seed=seed,
        )
    return fp.PathologicalPartitioner(
        num_partitions=n, partition_by="label",
        num_classes_per_partition=spec.classes_per_client, class_assignment_mode="random",
        seed=seed,
    )


def _assigned_partitioner(labels: np.ndarray, spec: DataSpec, seed: int,
                          groups: np.ndarray | None = None):
    """A partitioner over a seeded shuffle of ``labels`` (the iid partitioner cuts in order);
    ``groups``: each example's natural group, for ``partition = "natural"``."""
    from datasets import Dataset

    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner = _partitioner(spec, seed)
    columns = {"label": labels[order], "index": order}
    if groups is not None:
        columns["group"] = groups[order]
    partitioner.dataset = Dataset.from_dict(columns)
    return partitioner


def _load(partitioner, spec: DataSpec, n_examples: int, partition_id: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # its resampling notices; a final failure raises below
            warnings.simplefilter("ignore", UserWarning)
            part = partitioner.load_partition(partition_id)["index"]
    except ValueError as err:
        raise ValueError(
            f"cannot split {n_examples} examples into data.num_clients={spec.num_clients} "
            f"with data.partition={spec.partition!r}: {err}"
        ) from None
    return np.sort(np.asarray(part, dtype=np.int64))


def partition_indices(labels: np.ndarray, spec: DataSpec, seed: int,
                      groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Indices of each client's partition (sorted), for all ``spec.num_clients`` clients."""
    partitioner = _assigned_partitioner(labels, spec, seed, groups)
    return [_load(partitioner, spec, len(labels), i) for i in range(spec.num_clients)]


def local_split(indices: np.ndarray, test_fraction: float, seed: int,
                partition_id: int) -> ClientIndices:
    """Seeded split of one client's partition into local train and test indices."""
    rng = np.random.default_rng([seed, partition_id])
    shuffled = rng.permutation(indices)
    n_test = round(test_fraction * len(indices))
    return ClientIndices(train=np.sort(shuffled[n_test:]), test=np.sort(shuffled[:n_test]))


@lru_cache(maxsize=4)
def _cached_partitioner(spec: DataSpec, seed: int):
    from fedsparse.data.datasets import load_dataset

    data = load_dataset(spec.dataset)
    return _assigned_partitioner(data.y_train, spec, seed, getattr(data, "groups", None))


@lru_cache(maxsize=1024)
def client_indices(spec: DataSpec, seed: int, partition_id: int) -> ClientIndices:
    """The local train/test indices of client ``partition_id`` (cached per process).

    Only this client's partition is materialised, so a Ray actor or a SuperNode pays
    for the clients it serves, not for all of them.
    """
    if not 0 <= partition_id < spec.num_clients:
        raise ValueError(
            f"partition-id {partition_id} out of range for data.num_clients={spec.num_clients}"
        )
    partitioner = _cached_partitioner(spec, seed)
    part = _load(partitioner, spec, len(partitioner.dataset), partition_id)
    return local_split(part, spec.test_fraction, seed, partition_id)
