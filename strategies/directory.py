"""Which Flower node serves which partition: found without a round trip per client.

Flower node ids are random per run, while fedsparse samples, seeds and orders clients by
partition id (so that a scenario and its seed give the same run whatever the ids). How the
server learns the node of each partition depends on who may be trusted to say it:

- :class:`Assigned` (simulation): a simulated node is a slot, not a client. Every
  instruction names its partition (``partition-id`` in its config) and a simulated ClientApp
  serves the partition it is told (``clients/client_app.py``), its state coming from the
  per-partition store; so the simulation runs only as many nodes as a round contacts at
  once (``Scenario.simulated_nodes``) and the server hands the instructions to them in
  turn. One ``get_node_ids`` call before round 1, whatever the number of clients.
- :class:`Registered` (a ``fedsparse deploy`` federation with node authentication): node id
  -> partition from the deployment's registry, which the server itself wrote when it
  registered each node's key. No node is asked; a node whose own node config names another
  partition than the instruction refuses it (that client fails its round, with the reason).
- :class:`Declared` (a deployment without node authentication): nodes say which partition
  they serve. Only nodes not seen before are asked, before round 1 and again before every
  round, so that nodes may join late, leave and come back; a partition whose node left is
  unavailable until a node serves it again.

Every instruction carries its partition id (:meth:`Directory.stamp`), whichever the mode. A
reply counts for the client :meth:`Directory.sender` says, from what the server itself
knows, never from the reply's word: the partition of its node in a deployment, the
partition its instruction named in simulation.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod

from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict
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

    def _route(self, partition_id: int) -> int | None:
        """The node an instruction for ``partition_id`` goes to (None: none serves it)."""
        return self.node(partition_id)

    def message(self, partition_id: int, content: RecordDict,
                message_type: str) -> Message | None:
        """An instruction for client ``partition_id`` (None: no node serves it now)."""
        node_id = self._route(partition_id)
        if node_id is None:
            return None
        return Message(content=self.stamp(content, partition_id), dst_node_id=node_id,
                       message_type=message_type)

    def sender(self, reply: Message) -> int | None:
        """The client ``reply`` counts for (None: none): by default the partition its node
        serves, a node being a client."""
        return self.partition(reply.metadata.src_node_id)

    def begin_round(self, grid: Grid) -> None:
        """Before a round: follow the nodes that joined or left (:meth:`refresh`)."""
        self.refresh(grid)

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
                raise DiscoveryError(f"only {len(nodes)} of the {count} {what} connected "
                                     f"within run.node_wait_s={wait_s}")
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
    """Simulation: each instruction goes to the next of the simulation's nodes in turn.

    The simulation runs as many nodes as a round contacts at once
    (``Scenario.simulated_nodes``), so the instructions of one exchange go to distinct
    nodes, and a node serves a different partition from one exchange to the next.

    ``actors``: how many ClientApp processes (Ray actors) the simulation runs at once. Before
    round 1 that many clients are asked to warm up (:func:`clients.client_app.warm_up`), one
    per actor, so that the seconds a process spends before its first training step do not
    come out of the first round's ``run.round_timeout_s``: a cost in processes, not clients.
    """

    def __init__(self, scenario: Scenario, actors: int) -> None:
        super().__init__(scenario)
        self.actors = actors
        self._slots: list[int] = []
        self._turn = 0
        # this round's instructions: the metadata Flower gives its message id when it is
        # pushed, and the partition it names; then message id -> (partition, node asked)
        self._asked: list[tuple[Metadata, int]] = []
        self._answers_to: dict[str, tuple[int, int]] = {}

    def _route(self, partition_id: int) -> int | None:
        node_id = self._slots[self._turn % len(self._slots)]
        self._turn += 1
        return node_id

    def message(self, partition_id: int, content: RecordDict,
                message_type: str) -> Message | None:
        message = super().message(partition_id, content, message_type)
        if message is not None:
            self._asked.append((message.metadata, partition_id))
        return message

    def sender(self, reply: Message) -> int | None:
        """The partition named by the instruction ``reply`` answers, as the server recorded
        it when it made the instruction this round (a node serves many partitions); None for
        a reply to none of them, or from another node than the one asked."""
        unpushed = []
        for metadata, partition_id in self._asked:
            if metadata.message_id:  # set by Grid.push_messages
                self._answers_to[metadata.message_id] = (partition_id, metadata.dst_node_id)
            else:
                unpushed.append((metadata, partition_id))
        self._asked = unpushed
        asked = self._answers_to.get(reply.metadata.reply_to_message_id)
        if asked is None or asked[1] != reply.metadata.src_node_id:
            return None
        return asked[0]

    def begin_round(self, grid: Grid) -> None:
        self._asked.clear()
        self._answers_to.clear()
        super().begin_round(grid)

    def start(self, grid: Grid) -> None:
        self._slots = self._wait(grid, self.scenario.simulated_nodes(), "simulated nodes")
        warm = [self.message(pid, RecordDict(), MessageType.QUERY)
                for pid in range(min(self.actors, self.expected))]
        for reply in exchange(grid, [m for m in warm if m is not None],
                              self.scenario.run.node_wait_s):
            if reply.has_error():
                log.warning("client %s did not warm up: %s", self.sender(reply),
                            reply.error.reason)


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
        self._wait(grid, self.expected, "registered nodes (data.num_clients)")


class Declared(Directory):
    """A deployment without node authentication: new nodes are asked which partition they
    serve (``partition-id``/``num-partitions`` of their node config)."""

    def start(self, grid: Grid) -> None:
        nodes = self._wait(grid, self.expected, "nodes (data.num_clients)")
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
    return Assigned(scenario, actors=scenario.run.actors())
