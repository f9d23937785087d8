"""Fault injection (``[faults]``, simulation only): train and evaluate calls of the ClientApp
that crash, hang, reply corrupted, or find their node unreachable, so that a run shows what
the server does with each (``strategies/base.py``: ``failed``, ``no-reply``, ``rejected``,
``unavailable`` in ``clients.csv``).

Which fault a call gets, if any, is drawn from ``faults.seed``, the partition, the round and
the phase only (:func:`draw`), so a run with faults is reproducible and a test can say
exactly what should have happened. The server's own QUERY messages (partition discovery,
the SCAFFOLD audit of every c_i) are instrumentation, not client calls: they are never
faulted, so what they measure stays exact.

- ``crash``: the ClientApp raises (Flower turns it into an error reply).
- ``unavailable``: an error reply with Flower's ``NODE_UNAVAILABLE``, as the SuperLink
  sends for a node it cannot reach; the client does no work.
- ``hang``: the client trains (and saves its state) as usual, then sleeps
  ``run.round_timeout_s + faults.hang_extra_s`` before it replies, after its round: the
  server pulls only replies to the exchange in progress, so that reply is never counted.
- ``corrupt``: the reply is corrupted (``clients/corruptions.py``) after the client program
  produced it and the ClientApp saved the state that holds if the round counts, as a fault
  on the wire would; the server rejects it, so that state is never committed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

from clients.corruptions import Situation, corrupt
from fedsparse.data import client_indices
from fedsparse.protocol import CONFIG, SERVER_ROUND, derive_seed
from fedsparse.scenario import FAULTS, REPLY_CORRUPTIONS, FaultSpec, Scenario

Handler = Callable[[Message, Context], Message]
Client = Callable[[Message, Context], tuple[Scenario, int]]  # a call's scenario and partition


class InjectedCrash(RuntimeError):
    """The ClientApp crashing, as ``faults.crash`` asked."""


@dataclass(frozen=True)
class Fault:
    """A call's fault: one of ``FAULTS``, and for ``corrupt`` the kind of corruption."""

    kind: str
    corruption: str = ""


# What the server records in clients.csv for a call with each fault (strategies/base.py).
RECORDED_AS = {"crash": "failed", "hang": "no-reply", "corrupt": "rejected",
               "unavailable": "unavailable"}


def recorded_as(fault: Fault | None) -> str:
    """The status a call with ``fault`` must have in clients.csv ("ok" without one)."""
    return "ok" if fault is None else RECORDED_AS[fault.kind]


def _rng(spec: FaultSpec, partition_id: int, server_round: int, phase: str,
         purpose: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed("faults", spec.seed, partition_id, server_round,
                                             phase, purpose))


def draw(spec: FaultSpec, partition_id: int, server_round: int, phase: str) -> Fault | None:
    """The fault of client ``partition_id``'s ``phase`` call ("train" or "evaluate") in
    ``server_round``, or None: one uniform draw against the probabilities in ``FAULTS``
    order, then a corruption drawn uniformly from ``faults.corruptions`` (for an evaluate
    reply, which carries no arrays, from those of them that apply to any reply)."""
    rng = _rng(spec, partition_id, server_round, phase, "fault")
    u, threshold = rng.random(), 0.0
    for kind in FAULTS:
        threshold += getattr(spec, kind)
        if u < threshold:
            break
    else:
        return None
    if kind != "corrupt":
        return Fault(kind)
    kinds = [k for k in spec.corruptions if phase == "train" or k in REPLY_CORRUPTIONS]
    return Fault(kind, kinds[int(rng.integers(len(kinds)))])


def with_faults(client: Client) -> Callable[[Handler], Handler]:
    """Decorate a train or evaluate handler of the ClientApp with the faults of the
    scenario's ``[faults]`` (none without it); ``client`` says which scenario and partition
    a call is for."""
    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def call(msg: Message, context: Context) -> Message:
            scenario, partition_id = client(msg, context)
            spec = scenario.faults
            if spec is None:
                return handler(msg, context)
            phase = msg.metadata.message_type
            config = msg.content.config_records.get(CONFIG, ConfigRecord())
            server_round = int(config.get(SERVER_ROUND, 0))
            fault = draw(spec, partition_id, server_round, phase)
            if fault is None:
                return handler(msg, context)
            where = f"{phase}, round {server_round}, client {partition_id}"
            if fault.kind == "crash":
                raise InjectedCrash(f"fault injection: crash ({where})")
            if fault.kind == "unavailable":
                return Message(Error(ErrorCode.NODE_UNAVAILABLE,
                                     f"fault injection: node unavailable ({where})"),
                               reply_to=msg)
            reply = handler(msg, context)
            if fault.kind == "hang":
                time.sleep(scenario.run.round_timeout_s + spec.hang_extra_s)
                return reply
            held = client_indices(scenario.data, scenario.seed, partition_id).size(phase)
            at = Situation(server_round, held, _rng(spec, partition_id, server_round, phase,
                                                     "corruption"))
            return Message(corrupt(fault.corruption, reply.content, at), reply_to=msg)
        return call
    return decorate
