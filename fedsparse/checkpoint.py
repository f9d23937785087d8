"""Checkpoints of the server's state after every finished round, so no round is ever lost.

One file, ``checkpoint.npz``, written atomically (write to a temp file, then rename): the
global model and any server-side arrays by name, plus a JSON document (round, counters,
per-round history, MLflow run id) stored as a byte array. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILE = "checkpoint.npz"
_STATE_KEY = "__state__"


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        """Write ``directory/checkpoint.npz``; a crash mid-write leaves the previous one intact."""
        if _STATE_KEY in self.arrays:
            raise ValueError(f"array name {_STATE_KEY!r} is reserved")
        directory.mkdir(parents=True, exist_ok=True)
        document = json.dumps({"round": self.round, **self.state}).encode()
        tmp = directory / f".{FILE}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **{_STATE_KEY: np.frombuffer(document, dtype=np.uint8)}, **self.arrays)
        os.replace(tmp, directory / FILE)
        return directory / FILE

    @classmethod
    def load(cls, directory: Path) -> Checkpoint:
        path = directory / FILE
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        with np.load(path, allow_pickle=False) as npz:
            state = _document(npz)
            arrays = {key: npz[key] for key in npz.files if key != _STATE_KEY}
        return cls(round=int(state.pop("round")), arrays=arrays, state=state)


def _document(npz: np.lib.npyio.NpzFile) -> dict[str, Any]:
    return json.loads(npz[_STATE_KEY].tobytes())


def finished_round(directory: Path) -> int | None:
    """The last round checkpointed in ``directory`` (None before the first one finished),
    read without loading the arrays (what an interrupted run reports)."""
    path = directory / FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return int(_document(npz)["round"])
