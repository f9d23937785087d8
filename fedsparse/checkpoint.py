"""Checkpoints of the server's state after every finished round, so no round is ever lost.

``checkpoint.npz`` holds the latest generation and ``checkpoint.prev.npz`` the one before:
the global model and every server-side array by name, plus a JSON document (round, counters,
per-round history, run ids), with a checksum (``fedsparse/durable.py``: written to a temp
file, fsynced, renamed; nothing pickled). Loading takes the latest one that reads back
intact, and falls back to the previous one, with a warning, when the latest is damaged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsparse.durable import CorruptFile, load_arrays, save_arrays

FILE, PREVIOUS = "checkpoint.npz", "checkpoint.prev.npz"
log = logging.getLogger("fedsparse.checkpoint")


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    state: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        """Write ``directory/checkpoint.npz``, keeping the one it replaces as the previous
        generation; a crash mid-write leaves both earlier generations intact."""
        return save_arrays(directory / FILE, self.arrays, {"round": self.round, **self.state},
                           previous=directory / PREVIOUS)

    @classmethod
    def load(cls, directory: Path) -> Checkpoint:
        """The latest generation that reads back intact (FileNotFoundError if there is
        none; CorruptFile if every one is damaged)."""
        found = [path for path in (directory / FILE, directory / PREVIOUS) if path.is_file()]
        if not found:
            raise FileNotFoundError(f"no checkpoint at {directory / FILE}")
        errors = []
        for path in found:
            try:
                arrays, state = load_arrays(path)
            except CorruptFile as err:
                errors.append(str(err))
                continue
            if errors:
                log.warning("checkpoint damaged (%s); resuming from the previous generation, "
                            "round %s", "; ".join(errors), state["round"])
            return cls(round=int(state.pop("round")), arrays=arrays, state=state)
        raise CorruptFile("every checkpoint generation is damaged: " + "; ".join(errors))


def finished_round(directory: Path) -> int | None:
    """The round a resume from ``directory`` continues after, that of the generation
    :meth:`Checkpoint.load` takes (what an interrupted run reports); None when there is
    nothing to resume from."""
    try:
        return Checkpoint.load(directory).round
    except (FileNotFoundError, CorruptFile):
        return None
