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
  (``NaturalIdPartitioner``; groups in sorted order). On ``synthetic`` every client is its
  own group: its examples are generated for it (``fedsparse/data/synthetic.py``), and no
  partitioner is involved.

Each client's partition is then split into a local train and a local test part. The same
spec and seed always give the same partition, in every process and whichever client a
process serves first. :func:`check_partition` makes that split once, before a run starts,
says which data key makes it impossible, and keeps it for the run's processes
(``split_store.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedsparse.data import split_store, synthetic
from fedsparse.scenario import PARTITION_KEYS, DataSpec, ScenarioError, SyntheticSpec

RESAMPLING_CALLS = 10  # DirichletPartitioner draws 10 times per call before it raises


@dataclass(frozen=True)
class ClientIndices:
    """Indices into the dataset's training arrays for one client (on ``synthetic``: into the
    client's own generated examples)."""

    train: np.ndarray
    test: np.ndarray

    def size(self, phase: str) -> int:
        """The examples this client holds for ``phase``: its local train split for "train",
        its local test split for "evaluate" (what a reply's ``num-examples`` may be)."""
        return len(self.train if phase == "train" else self.test)


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
    raise ValueError(_cannot_split(spec, n_examples, error)) from None


def _cannot_split(spec: DataSpec, n_examples: int, reason: Exception) -> str:
    """One line: the split ``spec`` asks of ``n_examples`` failed, with the keys that shape it."""
    key = PARTITION_KEYS.get(spec.partition)
    knobs = [f"data.{key}={getattr(spec, key)}"] if key else []
    if spec.partition == "dirichlet":
        knobs += [f"data.min_partition_size={spec.min_partition_size}",
                  f"{RESAMPLING_CALLS * 10} draws"]
    shape = f" ({', '.join(knobs)})" if knobs else ""
    return (f"cannot split {n_examples} examples into data.num_clients={spec.num_clients} with "
            f"data.partition={spec.partition!r}{shape}: {reason}")


def _load(partitioner, partition_id: int) -> np.ndarray:
    """The dataset indices of one partition, sorted. The column is read as one numpy slice:
    ``partition["index"]`` iterates row by row in Python, and cost some 0.1 s per 3,000-row
    client (a Ray actor pays it for every client it serves, the server for every client it
    checks a reply of)."""
    rows = partitioner.load_partition(partition_id).with_format("numpy", columns=["index"])[:]
    return np.sort(rows["index"].astype(np.int64, copy=False))


def partition_indices(labels: np.ndarray, spec: DataSpec, seed: int,
                      groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Indices of each client's partition (sorted), for all ``spec.num_clients`` clients."""
    partitioner = _assigned_partitioner(labels, spec, seed, groups)
    return [_load(partitioner, i) for i in range(spec.num_clients)]


def local_test_size(n: int, test_fraction: float) -> int:
    """How many of a client's ``n`` examples go to its local test split."""
    return round(test_fraction * n)


def local_split(indices: np.ndarray, test_fraction: float, seed: int,
                partition_id: int) -> ClientIndices:
    """Seeded split of one client's partition into local train and test indices."""
    rng = np.random.default_rng([seed, partition_id])
    shuffled = rng.permutation(indices)
    n_test = local_test_size(len(indices), test_fraction)
    return ClientIndices(train=np.sort(shuffled[n_test:]), test=np.sort(shuffled[:n_test]))


def synthetic_split(n: int, test_fraction: float) -> ClientIndices:
    """A synthetic client's ``n`` examples (exchangeable draws): the first for training, the
    last :func:`local_test_size` for its local test split."""
    n_train = n - local_test_size(n, test_fraction)
    return ClientIndices(train=np.arange(n_train), test=np.arange(n_train, n))


@lru_cache(maxsize=4)
def _cached_partitioner(spec: DataSpec, seed: int):
    from fedsparse.data.datasets import load_dataset

    data = load_dataset(spec.dataset)
    return _assigned_partitioner(data.y_train, spec, seed, getattr(data, "groups", None))


def client_indices(spec: DataSpec, seed: int, partition_id: int) -> ClientIndices:
    """The local train/test indices of client ``partition_id``.

    Only this client's partition is materialised, so a Ray actor or a SuperNode pays
    for the clients it serves, not for all of them: on ``synthetic`` only its size is drawn
    (each time: it costs less than a cache entry would hold), else its partition is read
    from the kept split or the process's partitioner (cached per process, 1,024 clients).
    """
    if not 0 <= partition_id < spec.num_clients:
        raise ValueError(
            f"partition-id {partition_id} out of range for data.num_clients={spec.num_clients}"
        )
    if spec.synthetic is not None:
        n = synthetic.client_size(spec.synthetic, seed, partition_id)
        return synthetic_split(n, spec.test_fraction)
    return _partitioned_indices(spec, seed, partition_id)


@lru_cache(maxsize=1024)
def _partitioned_indices(spec: DataSpec, seed: int, partition_id: int) -> ClientIndices:
    stored = _stored_splits(spec, seed)
    if stored is not None:
        return stored[partition_id]
    partitioner = _cached_partitioner(spec, seed)
    return local_split(_load(partitioner, partition_id), spec.test_fraction, seed, partition_id)


class LazySplits(Sequence[ClientIndices]):
    """Every client's split, each made when it is asked for (:func:`client_indices`): a
    synthetic federation may have millions of clients."""

    def __init__(self, spec: DataSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed

    def __len__(self) -> int:
        return self.spec.num_clients

    def __getitem__(self, partition_id: int) -> ClientIndices:
        if not 0 <= partition_id < len(self):
            raise IndexError(partition_id)
        return client_indices(self.spec, self.seed, partition_id)


def check_partition(spec: DataSpec, seed: int, source: str = "<scenario>",
                    store: Path | None = None) -> Sequence[ClientIndices]:
    """Every client's local train/test split, as a run will make it; a :class:`ScenarioError`
    naming the data key that makes the split impossible or leaves a client without a local
    training example. ``store``: a folder of split files (``split_store``) where a split
    that passed is kept for the run's processes, and read instead of made again.

    It loads the dataset: call it where a run is set up (the CLI), not where every process
    parses the scenario. On ``synthetic`` it generates nothing: the check is on the sizes the
    scenario allows, and the splits come lazily (:class:`LazySplits`).
    """
    from fedsparse.data.datasets import DatasetUnavailable, load_dataset

    if spec.synthetic is not None:
        problems = _synthetic_problems(spec.synthetic, spec.test_fraction)
        if problems:
            raise ScenarioError(source, problems)
        return LazySplits(spec, seed)
    try:
        data = load_dataset(spec.dataset)
    except DatasetUnavailable as err:
        raise ScenarioError(source, [f"data.dataset = {spec.dataset!r}: {err}"]) from None
    path = None if store is None else _split_path(store, spec, seed)
    stored = None if path is None else split_store.load_splits(path)
    if stored is not None:  # kept only once it had passed this check
        return [ClientIndices(train, test) for train, test in stored]
    labels = data.y_train
    problems = _impossible_sizes(spec, len(labels), len(np.unique(labels)))
    if problems:
        raise ScenarioError(source, problems)
    try:
        parts = partition_indices(labels, spec, seed, getattr(data, "groups", None))
    except ValueError as err:  # already one line that names the keys (_determined)
        raise ScenarioError(source, [str(err)]) from None
    except (ZeroDivisionError, IndexError) as err:
        raise ScenarioError(source, [_cannot_split(spec, len(labels), err)]) from None
    splits = [local_split(part, spec.test_fraction, seed, i) for i, part in enumerate(parts)]
    problems = _without_training_examples(spec, parts, splits)
    if problems:
        raise ScenarioError(source, problems)
    if path is not None:
        split_store.save_splits(path, [(split.train, split.test) for split in splits])
    return splits


def _split_path(directory: Path, spec: DataSpec, seed: int) -> Path:
    from fedsparse.data.datasets import load_dataset

    data = load_dataset(spec.dataset)
    return split_store.split_path(directory, spec, seed, data.y_train,
                                  getattr(data, "groups", None))


@lru_cache(maxsize=4)
def _stored_splits(spec: DataSpec, seed: int) -> list[ClientIndices] | None:
    """Every client's split from the run's split file (``split_store``), if this process
    sees one; None: make the split here."""
    directory = split_store.store_dir()
    stored = None if directory is None else \
        split_store.load_splits(_split_path(directory, spec, seed))
    if stored is None or len(stored) != spec.num_clients:
        return None
    return [ClientIndices(train, test) for train, test in stored]


def _impossible_sizes(spec: DataSpec, n_examples: int, n_classes: int) -> list[str]:
    """What no split of ``n_examples`` of ``n_classes`` classes can give, whatever the draw."""
    of = f"the {n_examples} training examples of {spec.dataset!r}"
    clients = spec.num_clients
    if clients > n_examples:
        return [f"data.num_clients = {clients}: more clients than {of} "
                f"(allowed: at most {n_examples})"]
    per_client = {"dirichlet": ("min_partition_size", "examples"),
                  "shards": ("shards_per_client", "shards")}.get(spec.partition)
    if per_client and getattr(spec, per_client[0]) * clients > n_examples:
        key, unit = per_client
        value = getattr(spec, key)
        return [f"data.{key} = {value}: {clients} clients x {value} = {clients * value} "
                f"{unit}, more than {of} (allowed: at most {n_examples // clients})"]
    if spec.partition == "pathological" and spec.classes_per_client > n_classes:
        return [f"data.classes_per_client = {spec.classes_per_client}: more than the "
                f"{n_classes} classes of {spec.dataset!r} (allowed: 1 to {n_classes})"]
    return []


def _synthetic_problems(spec: SyntheticSpec, fraction: float) -> list[str]:
    """What a synthetic client of the smallest size, ``data.synthetic.size_min``, would lack
    under ``data.test_fraction``: a local training example, or a local test example (the
    server's test set is made of clients' test splits). Neither split shrinks as a client
    grows, so the smallest client decides for every client."""
    smallest = spec.size_min
    n_test = local_test_size(smallest, fraction)
    of = (f"data.test_fraction = {fraction}: leaves a client of data.synthetic.size_min = "
          f"{smallest} examples")
    if n_test == smallest:
        return [f"{of} no local training example (allowed: below "
                f"{(smallest - 0.5) / smallest:.3g})"]
    if n_test == 0:
        return [f"{of} no local test example, and the server's test set is made of the "
                f"clients' test splits (allowed: above {0.5 / smallest:.3g})"]
    return []


def _without_training_examples(spec: DataSpec, parts: list[np.ndarray],
                               splits: list[ClientIndices]) -> list[str]:
    """The clients a split leaves with no local training example, named by the key to blame:
    the partition if it gave them nothing, else ``data.test_fraction``."""
    empty = [i for i, part in enumerate(parts) if part.size == 0]
    if empty:
        hint = (f"; raise data.min_partition_size (now {spec.min_partition_size})"
                if spec.partition == "dirichlet" else "")
        return [f"data.partition = {spec.partition!r}: leaves {len(empty)} of the "
                f"{spec.num_clients} clients with no example (client {empty[0]}){hint}"]
    bare = [split for split in splits if split.train.size == 0]
    if not bare:
        return []
    smallest = min(part.size for part in parts)
    return [f"data.test_fraction = {spec.test_fraction}: leaves {len(bare)} of the "
            f"{spec.num_clients} clients with no local training example (the smallest "
            f"partition is {smallest}; allowed: below {(smallest - 0.5) / smallest:.3g})"]
