"""Client state that outlives a message, kept as of the last round the server committed.

What a client carries from round to round (SCAFFOLD's c_i and SCAFCOM's v_i, error-feedback
residuals, the public model of a compressed downlink, a replay buffer and DDR statistics,
pFedGate's gating layer and momentum) is saved by the client after it trains round ``t``, as
the state it will have *if the server counts that round*: one durable file per round
(``fedsparse/durable.py``) under ``<root>/<fedsparse run id>/<partition id>/``. Every
instruction carries ``commit-round``, the last round in which the server counted this
client's update; the client starts from the state it saved in that round (nothing for 0).
A round the server did not count (lost, rejected, a round below the minimums, a round the
server never checkpointed because it was killed) is thus, for the client, a round that never
happened: the two-phase commit of every piece of client state, and what makes a resumed run
exact (the server's checkpoint holds the commit rounds; the files hold the states).

Kept per client: the round being trained, the latest committed one and the one committed
before it (the state a fallback to the previous server checkpoint needs); older files are
deleted. The root is the run folder's ``client-state/`` in simulation, the node's own folder
on a device. Keyed by fedsparse's run id, which a resume keeps (Flower's changes), and the
partition id. Memory holds only the clients being served; all clients cost disk.

In simulation any Ray node may serve any client in any round, so every node must see the
run folder's ``client-state/`` at the same path (one host; on a cluster, a shared folder such
as NFS). ``fedsparse run`` creates it before any client runs, so a node where it is missing
does not see the run's folder: :func:`shared_root` refuses to serve from it, rather than let
the node keep client state that the others never read.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np

from fedsparse.durable import CorruptFile, load_arrays, save_arrays

Arrays = dict[str, np.ndarray]
ROUND_FILE = re.compile(r"^round-(\d+)\.npz$")


class StateMissing(RuntimeError):
    """The state a client must start from is not there (its folder was lost or damaged)."""


class StateUnreachable(RuntimeError):
    """This node does not see the folder the run keeps its clients' state in."""


def shared_root(root: str) -> str:
    """``root``, the run's client state folder, once this node is found to see it (``""``
    passes: no such folder); StateUnreachable, naming the host, where it is missing."""
    if root and not os.path.isdir(root):
        raise StateUnreachable(
            f"client state folder {root} does not exist on host {socket.gethostname()}: "
            f"fedsparse run made it before any client ran, so this node does not see the "
            f"run folder; on a Ray cluster the run folder must be on a folder every node "
            f"mounts at the same path, e.g. NFS (README: Simulation on a Ray cluster)")
    return root


class StateStore:
    """One client's saved states, one file per round it trained."""

    def __init__(self, root: Path, run_id: str, partition_id: int) -> None:
        self.directory = root / run_id / str(partition_id)

    def path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:08d}.npz"

    def rounds(self) -> list[int]:
        """The rounds whose state is on disk."""
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir()
                      if (m := ROUND_FILE.match(p.name)))

    def load(self, server_round: int) -> tuple[dict[str, Arrays], int]:
        """``(components, the committed round that state was built on)`` saved in
        ``server_round``; nothing for round 0 (a client that never counted) or for a client
        that never saved any state (a stateless program writes no files)."""
        if server_round == 0 or not self.directory.is_dir():
            return {}, 0
        try:
            flat, document = load_arrays(self.path(server_round))
        except FileNotFoundError:
            raise StateMissing(f"no client state for round {server_round} in "
                               f"{self.directory}") from None
        except CorruptFile as err:
            raise StateMissing(f"client state damaged: {err}") from None
        components: dict[str, Arrays] = {}
        for key, value in flat.items():
            name, _, array = key.partition("/")
            components.setdefault(name, {})[array] = value
        return components, int(document["based_on"])

    def save(self, server_round: int, components: dict[str, Arrays], based_on: int,
             keep: set[int]) -> None:
        """Save the state of ``server_round`` (built on committed round ``based_on``) and
        delete every other round's file not in ``keep``."""
        flat = {f"{name}/{key}": np.ascontiguousarray(value)
                for name, arrays in components.items() for key, value in arrays.items()}
        save_arrays(self.path(server_round), flat, {"round": server_round,
                                                    "based_on": based_on})
        for old in set(self.rounds()) - keep - {server_round}:
            self.path(old).unlink(missing_ok=True)


class ClientState:
    """A client's state for one instruction: what it had as of ``commit_round``, and what it
    stages for the round it trains (saved by :meth:`save`)."""

    def __init__(self, store: StateStore, commit_round: int, server_round: int) -> None:
        self.store = store
        self.commit_round = commit_round
        self.server_round = server_round
        self._committed: dict[str, Arrays] | None = None
        self._based_on = 0
        self._staged: dict[str, Arrays] = {}

    @property
    def committed(self) -> dict[str, Arrays]:
        if self._committed is None:
            self._committed, self._based_on = self.store.load(self.commit_round)
        return self._committed

    def get(self, name: str) -> Arrays:
        """Component ``name`` as this client holds it ({} if it has none)."""
        if name in self._staged:
            return self._staged[name]
        return self.committed.get(name, {})

    def put(self, name: str, arrays: Arrays) -> None:
        """Stage component ``name`` for the state of this round."""
        self._staged[name] = dict(arrays)

    def save(self) -> None:
        """Write this round's state (the committed one with the staged components over it),
        if anything was staged; keep the two latest committed rounds."""
        if not any(self._staged.values()):
            return
        components = {**self.committed, **self._staged}
        self.store.save(self.server_round, components, based_on=self.commit_round,
                        keep={self.commit_round, self._based_on})
