"""Split a dataset over clients the way FL papers do, with flwr-datasets' partitioners.

- ``iid``: a seeded shuffle cut into equal parts (``IidPartitioner`` on shuffled data).
- ``dirichlet``: label skew, client class proportions ~ Dir(alpha) (Hsu et al. 2019;
  ``DirichletPartitioner``, resampled until every client has ``min_partition_size``: up to
  ``RESAMPLING_CALLS`` calls of its 10 draws each, on one generator).
- ``shards``: sort by label, cut into equal shards, deal ``shards_per_client`` to each client
  (McMahan et al. 2017; ``ShardPartitioner``), so a client sees at most that many classes.
- ``pathological``: exactly ``classes_per_client`` classes per client
  (``PathologicalPartitioner``).
- ``natural``: one client per natural group of the dataset, e.g. the language of a text
  (``NaturalIdPartitioner``; groups in sorted order).

Each client's partition is then split into a local train and a local test part. The same
spec and seed always give the same partition, in every process and whichever client a
process serves first.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedsparse.scenario import DataSpec

RESAMPLING_CALLS = 10  # DirichletPartitioner draws 10 times per call before it raises


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
    """A partitioner over a seeded shuffle of ``labels`` (the iid partitioner cuts in order),
    with every client's partition already determined; ``groups``: each example's natural
    group, for ``partition = "natural"``."""
    from datasets import Dataset

    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner = _partitioner(spec, seed)
    columns = {"label": labels[order], "index": order}
    if groups is not None:
        columns["group"] = groups[order]
    partitioner.dataset = Dataset.from_dict(columns)
    return _determined(partitioner, spec, len(labels))


def _determined(partitioner, spec: DataSpec, n_examples: int):
    """``partitioner`` once it has split the data, before any client is served.

    ``DirichletPartitioner`` makes 10 draws per ``load_partition`` call and raises if none
    gives every client ``min_partition_size``, but its generator keeps its state, so the
    next call draws anew. Left to the clients, a process whose first client met that error
    would hold another partition than one that did not (and that client would fail). Calling
    until a split succeeds, here, makes the partition a function of the spec and the seed.
    The other partitioners are deterministic: one call decides.
    """
    for _ in range(RESAMPLING_CALLS if spec.partition == "dirichlet" else 1):
        try:
            with warnings.catch_warnings():  # its resampling notices; a final failure raises
                warnings.simplefilter("ignore", UserWarning)
                partitioner.load_partition(0)
            return partitioner
        except ValueError as err:
            error = err
    knobs = (f" (data.alpha={spec.alpha}, data.min_partition_size={spec.min_partition_size},"
             f" {RESAMPLING_CALLS * 10} draws)" if spec.partition == "dirichlet" else "")
    raise ValueError(
        f"cannot split {n_examples} examples into data.num_clients={spec.num_clients} with "
        f"data.partition={spec.partition!r}{knobs}: {error}"
    ) from None


def _load(partitioner, partition_id: int) -> np.ndarray:
    return np.sort(np.asarray(partitioner.load_partition(partition_id)["index"], dtype=np.int64))


def partition_indices(labels: np.ndarray, spec: DataSpec, seed: int,
                      groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Indices of each client's partition (sorted), for all ``spec.num_clients`` clients."""
    partitioner = _assigned_partitioner(labels, spec, seed, groups)
    return [_load(partitioner, i) for i in range(spec.num_clients)]


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
    return local_split(_load(partitioner, partition_id), spec.test_fraction, seed, partition_id)
