"""Offline datasets and their split over clients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsparse.data.datasets import DatasetUnavailable, ImageDataset, available, load_dataset
from fedsparse.data.partition import ClientIndices, client_indices, partition_indices
from fedsparse.scenario import DataSpec

__all__ = [
    "ClientData",
    "ClientIndices",
    "DatasetUnavailable",
    "ImageDataset",
    "available",
    "client_data",
    "client_indices",
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


def client_data(spec: DataSpec, seed: int, partition_id: int) -> ClientData:
    """The data client ``partition_id`` holds in a scenario."""
    data = load_dataset(spec.dataset)
    idx = client_indices(spec, seed, partition_id)
    return ClientData(
        x_train=data.features(data.x_train[idx.train]),
        y_train=data.labels(data.y_train[idx.train]),
        x_test=data.features(data.x_train[idx.test]),
        y_test=data.labels(data.y_train[idx.test]),
    )


def held_out_set(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test set, for centralised evaluation on the server."""
    data = load_dataset(spec.dataset)
    return data.features(data.x_test), data.labels(data.y_test)
