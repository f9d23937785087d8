"""Which Flower node serves which partition: found without a round trip per client.

Flower node ids are random per run, while fedsparse samples, seeds and orders clients by
partition id (so that a scenario and its seed give the same run whatever the ids). How the
server learns the node of each partition depends on who may be trusted to say it:

- :class:`Assigned` (simulation): the Simulation Engine numbers its nodes itself, but the
  server cannot see that numbering. So the server assigns: the p-th smallest node id serves
  partition p, and every instruction names its partition (``partition-id`` in its config);
  a simulated ClientApp serves the partition it is told (``clients/client_app.py``). One
  ``get_node_ids`` call before round 1, whatever the number of clients.
- :class:`Registered` (a ``fedsparse deploy`` federation with node authentication): node id
  -> partition from the deployment's registry, which the server itself wrote when it
  registered each node's key. No node is asked; a node whose own node config names another
  partition than the instruction refuses it (that client fails its round, with the reason).
- :class:`Declared` (a deployment without node authentication): nodes say which partition
  they serve. Only nodes not seen before are asked, before round 1 and again before every
  round, so that nodes may join late, leave and come back; a partition whose node left is
  unavailable until a node serves it again.

Every instruction carries its partition id (:meth:`Directory.stamp`), whichever the mode.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsparse.payload import MetricSpec, PayloadError, check_metrics
from fedsparse.protocol import CONFIG, METRICS, NUM_PARTITIONS, PARTITION_ID
from fedsparse.scenario import Scenario
from strategies.exchange import exchange

log = logging.getLogger("fedsparse.directory")


class DiscoveryError(RuntimeError):
    """The connected nodes do not match the scenario's clients."""


class Directory(ABC):
    """Partition id <-> Flower node id for one run."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.expected = scenario.data.num_clients
        self._node_of: dict[int, int] = {}
        self._partition_of: dict[int, int] = {}

    def node(self, partition_id: int) -> int | None:
        """The node serving ``partition_id`` now (None: no connected node serves it)."""
        return self._node_of.get(partition_id)

    def partition(self, node_id: int) -> int | None:
        """The partition ``node_id`` serves (None: a node that serves no client)."""
        return self._partition_of.get(node_id)

    def nodes(self) -> dict[int, int]:
        """Partition id -> node id, in partition order."""
        return dict(sorted(self._node_of.items()))

    def _set(self, partition_id: int, node_id: int) -> None:
        old = self._node_of.pop(partition_id, None)
        if old is not None:
            self._partition_of.pop(old, None)
        self._node_of[partition_id] = node_id
        self._partition_of[node_id] = partition_id

    def _drop(self, node_id: int) -> None:
        partition_id = self._partition_of.pop(node_id, None)
        if partition_id is not None:
            self._node_of.pop(partition_id, None)

    @staticmethod
    def stamp(content: RecordDict, partition_id: int) -> RecordDict:
        """``content`` with its config naming the partition it is for."""
        config = content.config_records.get(CONFIG, ConfigRecord())
        stamped = RecordDict(dict(content.items()))
        stamped[CONFIG] = ConfigRecord({**config, PARTITION_ID: partition_id})
        return stamped

    def message(self, partition_id: int, content: RecordDict,
                message_type: str) -> Message | None:
        """An instruction for client ``partition_id`` (None: no node serves it now)."""
        node_id = self.node(partition_id)
        if node_id is None:
            return None
        return Message(content=self.stamp(content, partition_id), dst_node_id=node_id,
                       message_type=message_type)

    def _wait(self, grid: Grid, count: int, what: str) -> list[int]:
        """The connected node ids, once at least ``count`` of those :meth:`_counted` are there
        (DiscoveryError after ``run.node_wait_s``)."""
        wait_s = self.scenario.run.node_wait_s
        deadline = time.monotonic() + wait_s
        while True:
            nodes = sorted(self._counted(grid.get_node_ids()))
            if len(nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise DiscoveryError(f"only {len(nodes)} of data.num_clients={count} {what} "
                                     f"connected within run.node_wait_s={wait_s}")
            time.sleep(0.2)

    def _counted(self, node_ids: list[int]) -> list[int]:
        """The nodes that count towards the start of the run."""
        return list(node_ids)

    @abstractmethod
    def start(self, grid: Grid) -> None:
        """Learn the mapping before round 1 (waits for the nodes; DiscoveryError if wrong)."""

    def refresh(self, grid: Grid) -> None:
        """Follow nodes that joined or left, before a round (default: nothing changes)."""
        return None


class Assigned(Directory):
    """Simulation: the server assigns partition p to the p-th smallest node id.

    ``actors``: how many ClientApp processes (Ray actors) the simulation runs at once. Before
    round 1 that many clients are asked to warm up (:func:`clients.client_app.warm_up`), one
    per actor, so that the seconds a process spends before its first training step do not
    come out of the first round's ``run.round_timeout_s``: a cost in processes, not clients.
    """

    def __init__(self, scenario: Scenario, actors: int) -> None:
        super().__init__(scenario)
        self.actors = actors

    def start(self, grid: Grid) -> None:
        nodes = self._wait(grid, self.expected, "simulated nodes")
        if len(nodes) != self.expected:
            raise DiscoveryError(f"the simulation has {len(nodes)} nodes but the scenario has "
                                 f"data.num_clients={self.expected}")
        for partition_id, node_id in enumerate(nodes):
            self._set(partition_id, node_id)
        warm = [self.message(pid, RecordDict(), MessageType.QUERY)
                for pid in range(min(self.actors, self.expected))]
        for reply in exchange(grid, [m for m in warm if m is not None],
                              self.scenario.run.node_wait_s):
            if reply.has_error():
                log.warning("client %s did not warm up: %s",
                            self.partition(reply.metadata.src_node_id), reply.error.reason)


class Registered(Directory):
    """A deployment with node authentication: the registry is the truth, nobody is asked."""

    def __init__(self, scenario: Scenario, registered: dict[int, int]) -> None:
        super().__init__(scenario)
        self.registered = registered
        partitions = sorted(registered.values())
        missing = sorted(set(range(self.expected)) - set(partitions))
        if missing:
            raise DiscoveryError(f"data.num_clients={self.expected} but no node is registered "
                                 f"for partition ids {missing} (registered: {partitions})")
        if len(set(partitions)) != len(partitions):
            raise DiscoveryError(f"two registered nodes serve the same partition: {partitions}")
        for node_id, partition_id in registered.items():
            if partition_id < self.expected:
                self._set(partition_id, node_id)

    def _counted(self, node_ids: list[int]) -> list[int]:
        return [n for n in node_ids if self.registered.get(n, self.expected) < self.expected]

    def start(self, grid: Grid) -> None:
        self._wait(grid, self.expected, "registered nodes")


class Declared(Directory):
    """A deployment without node authentication: new nodes are asked which partition they
    serve (``partition-id``/``num-partitions`` of their node config)."""

    def start(self, grid: Grid) -> None:
        nodes = self._wait(grid, self.expected, "nodes")
        for node_id, partition_id in self._ask(grid, nodes):
            if self.node(partition_id) is not None:
                raise DiscoveryError(f"two nodes serve {PARTITION_ID}={partition_id}")
            self._set(partition_id, node_id)
        missing = sorted(set(range(self.expected)) - set(self._node_of))
        if missing:
            raise DiscoveryError(f"no node answered for partition ids {missing}")

    def refresh(self, grid: Grid) -> None:
        connected = set(grid.get_node_ids())
        for node_id in set(self._partition_of) - connected:
            log.warning("node %d (partition %d) left", node_id, self._partition_of[node_id])
            self._drop(node_id)
        new = sorted(connected - set(self._partition_of))
        if not new:
            return
        try:
            answers = self._ask(grid, new)
        except DiscoveryError as err:  # a newcomer's bad answer costs only the newcomer
            log.warning("a node that joined is left out: %s", err)
            return
        for node_id, partition_id in answers:
            if self.node(partition_id) is not None:
                log.warning("node %d claims partition %d, which node %d serves: ignored",
                            node_id, partition_id, self.node(partition_id))
                continue
            log.info("node %d joined for partition %d", node_id, partition_id)
            self._set(partition_id, node_id)

    def _ask(self, grid: Grid, nodes: list[int]) -> list[tuple[int, int]]:
        """``(node id, partition id)`` of each node that answered, in node-id order."""
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                   for n in nodes]
        answers = []
        replies = exchange(grid, queries, self.scenario.run.node_wait_s)
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                raise DiscoveryError(f"node {node_id} failed to identify itself: "
                                     f"{reply.error.reason}")
            partition_id, count = _identity(reply, self.expected)
            if count != self.expected:
                raise DiscoveryError(f"a node reports {NUM_PARTITIONS}={count} but the "
                                     f"scenario has data.num_clients={self.expected}")
            answers.append((node_id, partition_id))
        return answers


def _identity(reply: Message, expected: int) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` a node reports; DiscoveryError if malformed."""
    identity = {PARTITION_ID: MetricSpec(high=expected - 1, integer=True),
                NUM_PARTITIONS: MetricSpec(low=1, integer=True)}
    try:
        info = check_metrics(reply.content.metric_records[METRICS], identity)
        return int(info[PARTITION_ID]), int(info[NUM_PARTITIONS])
    except (KeyError, PayloadError) as err:
        raise DiscoveryError(f"node {reply.metadata.src_node_id} identified itself "
                             f"malformed: {err}") from None


def directory_for(scenario: Scenario, deployment: bool,
                  registered: dict[int, int] | None) -> Directory:
    """The directory of a run: the registry's when there is one, the nodes' word in a
    deployment without one, the server's assignment in simulation (as many warm-ups as the
    simulation's CPUs hold clients)."""
    if registered is not None:
        return Registered(scenario, registered)
    if deployment:
        return Declared(scenario)
    cpus = scenario.run.num_cpus or os.cpu_count() or 1
    return Assigned(scenario, actors=max(1, cpus // scenario.run.client_cpus))
