"""Compressed downlink: the clients train from a public model x_hat that follows the server's
model x by compressed steps, with the error kept on the server (as in bidirectional
compression with error feedback, e.g. DoubleSqueeze, Tang et al. 2019; EF21-P, Gruntkowska
et al. 2023):

    round t:   q_t = C_down(x_t - x_hat_{t-1});   x_hat_t = x_hat_{t-1} + q_t

The first round x_hat = x. Under partial participation a client may have missed rounds, so
it is sent an exact *overwrite* of the coordinates of x_hat that changed since it last
synchronised (indices + float32 values: idempotent and bit-exact), or the whole x_hat when
that is smaller. Every byte of either form is counted like any other payload.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsparse.compress import Compressor, Payload, payload_bytes
from fedsparse.compress import indices as codec
from fedsparse.compress.base import expect_array, expect_keys
from fedsparse.payload import PayloadError


class PublicModel:
    """Server side: x_hat, the supports of its changes per round, and sync payloads."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.x_hat: np.ndarray | None = None
        self.changed: dict[int, np.ndarray] = {}  # round -> coordinates of x_hat it changed
        self.first_round = 0

    def advance(self, server_round: int, x: np.ndarray, rng: np.random.Generator) -> None:
        """Move x_hat towards x by one compressed step (the first call sets x_hat = x)."""
        if self.x_hat is None:
            self.x_hat, self.first_round = x.astype(np.float32).copy(), server_round
            return
        _, step = self.compressor(x - self.x_hat, rng)
        self.x_hat = self.x_hat + step
        self.changed[server_round] = np.flatnonzero(step)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """x_hat, its first round and the coordinates each later round changed."""
        if self.x_hat is None:
            return {}
        return {"x_hat": self.x_hat, "first_round": np.array([self.first_round], np.int64),
                **{f"changed/{t}": idx for t, idx in self.changed.items()}}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.x_hat = arrays["x_hat"]
        self.first_round = int(arrays["first_round"][0])
        self.changed = {int(k.removeprefix("changed/")): v for k, v in arrays.items()
                        if k.startswith("changed/")}

    def sync(self, last_sync: int | None) -> Payload:
        """What a client that last synchronised in round ``last_sync`` needs to hold x_hat."""
        assert self.x_hat is not None, "advance() first"
        dense: Payload = {"val": self.x_hat}
        if last_sync is None or last_sync < self.first_round:
            return dense
        parts = [idx for t, idx in self.changed.items() if t > last_sync]
        idx = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        key, data = codec.encode(idx, self.x_hat.size)
        sparse: Payload = {key: data, "val": self.x_hat[idx]}
        return sparse if payload_bytes(sparse) < payload_bytes(dense) else dense


def apply_sync(local: np.ndarray | None, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
    """Client side: x_hat after a sync payload (validated; raises PayloadError)."""
    if any(key.startswith(f"{codec.KEY}.") for key in payload):
        if local is None or local.size != d:
            raise PayloadError("a partial model update needs the model this client already "
                               "holds, and it holds none of that size")
        scheme, data = codec.find(payload)
        idx = codec.decode(scheme, data, d)
        expect_keys(payload, {f"{codec.KEY}.{scheme}", "val"})
        out = local.copy()
        out[idx] = expect_array(payload, "val", np.dtype(np.float32), idx.size)
        return out
    expect_keys(payload, {"val"})
    return expect_array(payload, "val", np.dtype(np.float32), d).copy()
