"""Offline datasets, FedProx's synthetic data, and their split over clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsparse.data import synthetic
from fedsparse.data.datasets import DatasetUnavailable, ImageDataset, available, load_dataset
from fedsparse.data.partition import ClientIndices, client_indices, partition_indices
from fedsparse.scenario import DataSpec

__all__ = [
    "ClientData",
    "ClientIndices",
    "DatasetShape",
    "DatasetUnavailable",
    "ImageDataset",
    "available",
    "client_data",
    "client_indices",
    "dataset_shape",
    "held_out_set",
    "load_dataset",
    "partition_indices",
]


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test tensors (features normalised, labels int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class DatasetShape:
    """What a model is sized by: the shape of one example and the number of classes."""

    input_shape: tuple[int, ...]
    num_classes: int


def dataset_shape(spec: DataSpec) -> DatasetShape:
    """The example shape and classes of a scenario's data (synthetic: ``(dimension,)`` and
    ``classes`` of ``[data.synthetic]``; otherwise those of the dataset's files)."""
    if spec.synthetic is not None:
        return DatasetShape((spec.synthetic.dimension,), spec.synthetic.classes)
    data = load_dataset(spec.dataset)
    return DatasetShape(data.input_shape, data.num_classes)


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def client_data(spec: DataSpec, seed: int, partition_id: int) -> ClientData:
    """The data client ``partition_id`` holds in a scenario (synthetic: generated for it
    alone, features as drawn)."""
    idx = client_indices(spec, seed, partition_id)
    if spec.synthetic is not None:
        x, y = synthetic.client_examples(spec.synthetic, seed, partition_id)
        features, labels = _tensor, _tensor
    else:
        data = load_dataset(spec.dataset)
        x, y, features, labels = data.x_train, data.y_train, data.features, data.labels
    return ClientData(x_train=features(x[idx.train]), y_train=labels(y[idx.train]),
                      x_test=features(x[idx.test]), y_test=labels(y[idx.test]))


def held_out_set(spec: DataSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test set, for centralised evaluation on the server: the dataset's test
    files, or on ``synthetic`` the pooled local test splits of the seeded sample of clients
    :func:`fedsparse.data.synthetic.central_clients` names (in increasing client order)."""
    if spec.synthetic is not None:
        parts = [client_data(spec, seed, int(pid))
                 for pid in synthetic.central_clients(spec.synthetic, spec.num_clients, seed)]
        return torch.cat([p.x_test for p in parts]), torch.cat([p.y_test for p in parts])
    data = load_dataset(spec.dataset)
    return data.features(data.x_test), data.labels(data.y_test)
