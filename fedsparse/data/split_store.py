"""Every client's local split, made once and kept in a file for the processes of a run.

Making a split costs a process seconds of CPU: importing ``datasets`` and ``flwr_datasets``
(which imports seaborn and scipy), building the partitioner, cutting the partitions. The
CLI makes every client's split anyway when it checks a scenario
(``partition.check_partition``), so it keeps them in a file under ``.fedsparse/splits/`` of
the working directory, and the processes it starts (the ServerApp, the Ray actors, local
SuperNodes) find that folder in ``$FEDSPARSE_SPLITS_DIR`` (``runtime_env.process_env``) and
read their clients' splits from it. A process that does not see the folder (a node of a
Ray cluster, a device) makes the split itself: the same function of the same inputs, so
the same split.

A file is named by a SHA-256 of everything the split depends on: the data section of the
scenario, the seed, the dataset's labels (and natural groups), and the versions of
``datasets`` and ``flwr-datasets``, whose partitioners make it. It holds the clients' train
and test indices concatenated, with each client's end offsets, checksummed
(``fedsparse.durable``): a damaged file is made again, never trusted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np

from fedsparse.durable import CorruptFile, load_arrays, save_arrays
from fedsparse.runtime_env import SPLITS_ENV
from fedsparse.scenario import DataSpec

FORMAT = 1
Split = tuple[np.ndarray, np.ndarray]  # one client's (train, test) indices


def store_dir() -> Path | None:
    """The folder of split files this process reads (``$FEDSPARSE_SPLITS_DIR``), if any."""
    directory = os.environ.get(SPLITS_ENV, "")
    return Path(directory) if directory else None


def split_path(directory: Path, spec: DataSpec, seed: int, labels: np.ndarray,
               groups: np.ndarray | None) -> Path:
    """The file of the split ``spec`` and ``seed`` make of a dataset with these labels."""
    sha = hashlib.sha256(f"{FORMAT}:{spec.model_dump_json()}:{seed}:"
                         f"{version('datasets')}:{version('flwr-datasets')}".encode())
    for array in (labels, groups):
        if array is not None:
            sha.update(f"{array.dtype.str}:{array.shape}".encode())
            sha.update(np.ascontiguousarray(array).tobytes())
    return directory / f"{sha.hexdigest()[:32]}.npz"


def load_splits(path: Path) -> list[Split] | None:
    """The splits stored at ``path``; None if there is no such file or it is damaged."""
    try:
        arrays, _ = load_arrays(path)
    except (FileNotFoundError, CorruptFile):
        return None
    out = []
    for part in ("train", "test"):
        ends = arrays[f"{part}_ends"]
        out.append(np.split(arrays[part], ends[:-1]))
    return list(zip(*out, strict=True))


def save_splits(path: Path, splits: Sequence[Split]) -> None:
    """Store ``splits`` (in client order) at ``path``, atomically."""
    arrays = {}
    for i, part in enumerate(("train", "test")):
        chunks = [np.asarray(split[i], dtype=np.int64) for split in splits]
        arrays[part] = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        arrays[f"{part}_ends"] = np.cumsum([len(c) for c in chunks], dtype=np.int64)
    save_arrays(path, arrays, {"clients": len(splits)})
