"""The scenario: one TOML file that names everything a run needs, validated with pydantic.

Sections: top level (``name``, ``seed``, ``description``), ``[data]``, ``[model]``,
``[strategy]``, ``[client]``, ``[run]``, ``[continual]`` (optional), ``[faults]`` (optional,
simulation only), ``[tracking]``. The ``[model]``, ``[strategy]`` and ``[client]`` sections
are validated against the parameters of the model, strategy and client program they name
(see :mod:`fedsparse.registry`).
Unknown keys and bad values are rejected before anything starts, with an error that names
the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tomllib
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from fedsparse.registry import (
    CLIENT_PROGRAMS,
    MODELS,
    STRATEGIES,
    PluginParams,
    Registry,
    load_plugins,
)
from fedsparse.schema import SCENARIO_CONFIG


class ScenarioError(ValueError):
    """A scenario file (or an override) is invalid; ``problems`` lists one line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid scenario {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class ScenarioNote(UserWarning):
    """Something validation did to the scenario that the user should hear about (the CLI
    prints it as ``fedsparse: note: ...``)."""


# The data keys that apply to one partition only.
PARTITION_KEYS = {"dirichlet": "alpha", "shards": "shards_per_client",
                  "pathological": "classes_per_client"}


class Section(BaseModel):
    model_config = SCENARIO_CONFIG


class SyntheticSpec(Section):
    """``[data.synthetic]``: FedProx's Synthetic(alpha, beta) (Li et al., MLSys 2020, §5.1),
    generated per client from the scenario's seed (``fedsparse/data/synthetic.py``)."""

    alpha: float = Field(ge=0, description="model heterogeneity: u_k ~ N(0, alpha), a standard "
                                           "deviation as in the release")
    beta: float = Field(ge=0, description="feature heterogeneity: B_k ~ N(0, beta), a standard "
                                          "deviation as in the release")
    dimension: int = Field(60, ge=1, description="features per example, d")
    classes: int = Field(10, ge=2, description="classes, C")
    size_log_mean: float = Field(4.0, description="client sizes: size_min + floor(lognormal("
                                                  "size_log_mean, size_log_sigma)), at most "
                                                  "size_max")
    size_log_sigma: float = Field(2.0, ge=0)
    size_min: int = Field(50, ge=1, description="added to every lognormal draw: the smallest "
                                                "client")
    size_max: int = Field(10_000, ge=1, description="the largest client (the release has no "
                                                    "cap)")
    central_test_clients: int = Field(100, ge=1, description="the server's test set pools the "
                                                             "local test splits of this many "
                                                             "clients (a seeded sample; all "
                                                             "clients if fewer)")

    @model_validator(mode="after")
    def _sizes(self) -> SyntheticSpec:
        if self.size_max < self.size_min:
            raise ValueError(f"data.synthetic.size_max = {self.size_max}: below data.synthetic."
                             f"size_min = {self.size_min} (allowed: at least {self.size_min})")
        return self


class DataSpec(Section):
    """Dataset and how it is split over clients (each client also gets a local test split)."""

    dataset: Literal["mnist", "fashion_mnist", "digits", "chatterbot_en", "chatterbot",
                     "synthetic"] = "mnist"
    num_clients: int = Field(10, ge=1, le=10_000_000, description="image and text datasets: at "
                                                                  "most their training examples")
    partition: Literal["iid", "dirichlet", "shards", "pathological", "natural"] = Field(
        "iid", description="natural: one client per group of the dataset (chatterbot: language; "
                           "synthetic: every client is its own group)")
    alpha: float | None = Field(None, gt=0, description="Dirichlet concentration (dirichlet)")
    shards_per_client: int | None = Field(
        None, ge=1, description="label-sorted shards per client, McMahan et al. 2017 (shards)"
    )
    classes_per_client: int | None = Field(
        None, ge=1, description="exactly this many classes per client (pathological)"
    )
    min_partition_size: int = Field(10, ge=0, description="Dirichlet resamples below this")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="local test split per client")
    synthetic: SyntheticSpec | None = Field(None, description="dataset = 'synthetic' only")

    @model_validator(mode="after")
    def _partition_params(self) -> DataSpec:
        wrong = []
        for partition, key in PARTITION_KEYS.items():
            given = getattr(self, key) is not None
            if partition == self.partition and not given:
                wrong.append(f"partition = {partition!r} needs data.{key}")
            if partition != self.partition and given:
                wrong.append(f"data.{key} only applies to partition = {partition!r}, "
                             f"not {self.partition!r}")
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

    @model_validator(mode="after")
    def _synthetic_table(self) -> DataSpec:
        if self.dataset == "synthetic" and self.synthetic is None:
            raise ValueError("dataset = 'synthetic' needs a [data.synthetic] table with alpha "
                             "and beta (FedProx's Synthetic(alpha, beta))")
        if self.dataset != "synthetic" and self.synthetic is not None:
            raise ValueError(f"data.synthetic only applies to dataset = 'synthetic', not "
                             f"{self.dataset!r}")
        return self

    @model_validator(mode="after")
    def _natural_groups(self) -> DataSpec:
        if self.dataset == "synthetic":
            if self.partition != "natural":
                raise ValueError(f"data.partition = {self.partition!r}: dataset = 'synthetic' "
                                 f"generates every client's own data, so each client is its "
                                 f"own natural group (allowed: 'natural')")
            return self
        if self.partition != "natural":
            return self
        from fedsparse.data import load_dataset

        groups = getattr(load_dataset(self.dataset), "group_names", ())
        if not groups:
            raise ValueError(f"partition = 'natural' needs a dataset with natural groups "
                             f"(chatterbot, synthetic), not {self.dataset!r}")
        if self.num_clients != len(groups):
            raise ValueError(f"partition = 'natural' on {self.dataset!r} has one client per "
                             f"group: data.num_clients must be {len(groups)}")
        return self


RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own: the cluster ray.init() joins
# HOST:PORT (a name, an IPv4 address or a bracketed IPv6 one), or Ray's "auto"
_RAY_ADDRESS = re.compile(r"^(auto|([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d+))$")
_CLUSTER_CPUS = ("run.num_cpus = {num_cpus} cannot apply with {source}: on a Ray cluster the "
                 "CPUs are those each node was started with (ray start --num-cpus); remove "
                 "run.num_cpus (--unset run.num_cpus)")


def check_ray_address(value: str) -> str:
    """``value`` if it is "" or a Ray cluster address fedsparse can join, else ValueError
    saying what is allowed."""
    if not value:
        return value
    scheme, sep, _ = value.partition("://")
    if sep:
        raise ValueError(f"{scheme}://... is not a cluster address fedsparse can join (ray:// "
                         f"is Ray Client, http:// the dashboard of `ray job submit`): run "
                         f"fedsparse on a node of the cluster (e.g. its head) and give the "
                         f"head's HOST:PORT (its GCS address, port 6379 by default)")
    form = _RAY_ADDRESS.match(value)
    if form is None:
        raise ValueError("expected HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379) or "
                         "'auto'")
    if form["port"] is not None and not 1024 <= int(form["port"]) <= 65535:
        raise ValueError(f"port {form['port']}: Ray's ports are 1024-65535")
    return value


RAY_RESOURCE_UNIT = 0.0001  # Ray counts resources in fixed point with this resolution


class RunSpec(Section):
    """Rounds, evaluation cadence and simulation resources."""

    rounds: int = Field(10, ge=1)
    eval_every: int = Field(1, ge=1, description="centralised + federated evaluation cadence")
    backend: Literal["ray"] = "ray"
    client_cpus: int = Field(1, ge=1, description="CPUs per simulated client (Ray actor)")
    client_gpus: float = Field(
        0.0, ge=0, le=1, description="share of one GPU per simulated client (Ray actor); "
                                     "> 0 also lets every client train on a GPU its process "
                                     "sees (fedsparse/device.py), 0: clients train on the CPU")
    num_cpus: int | None = Field(None, ge=1, description="CPUs Ray may use (default: all); "
                                                         "not with a Ray cluster")
    ray_address: str = Field(
        "", description="an existing Ray cluster to run the simulation on, HOST:PORT of its "
                        "head (what `ray start --head` prints) or 'auto' (the cluster this "
                        "host is a node of); '' = $RAY_ADDRESS if set, else a Ray of the "
                        "run's own on this host. Simulation only")
    node_wait_s: float = Field(300.0, gt=0, description="how long the server waits for clients")
    round_timeout_s: float = Field(3600.0, gt=0, description="reply timeout per round")
    max_failed_round_fraction: float = Field(
        0.5, ge=0, le=1, description="a run whose rounds did not count more often than this "
                                     "(or never counted) ends with a non-zero exit code")
    max_client_examples: int = Field(
        1_000_000, ge=1, description="deployment: the most examples a client may report (in "
                                     "simulation the server knows each partition's size)")

    @field_validator("ray_address")
    @classmethod
    def _ray_address_form(cls, value: str) -> str:
        return check_ray_address(value)

    @model_validator(mode="after")
    def _cluster_has_its_own_cpus(self) -> RunSpec:
        if self.ray_address and self.num_cpus is not None:
            raise ValueError(_CLUSTER_CPUS.format(num_cpus=self.num_cpus,
                                                  source="run.ray_address"))
        return self

    def ray_cluster(self, environ: Mapping[str, str]) -> str:
        """The Ray cluster the simulation joins: ``ray_address``, else ``$RAY_ADDRESS``,
        else "" (a Ray of the run's own, started on this host with ``num_cpus``).
        ScenarioError for a malformed ``$RAY_ADDRESS``, or one that meets ``num_cpus``."""
        if self.ray_address:
            return self.ray_address
        address = environ.get(RAY_ADDRESS_ENV, "")
        source = f"for {RAY_ADDRESS_ENV}={address}"
        try:
            check_ray_address(address)
        except ValueError as err:
            raise ScenarioError(source, [f"{RAY_ADDRESS_ENV} = {address!r}: {err}"]) from None
        if address and self.num_cpus is not None:
            raise ScenarioError(source, [_CLUSTER_CPUS.format(num_cpus=self.num_cpus,
                                                              source=RAY_ADDRESS_ENV)])
        return address

    def cpus(self) -> int:
        """The CPUs of a Ray of the run's own: ``num_cpus``, else this host's."""
        return self.num_cpus or os.cpu_count() or 1

    def actors(self) -> int:
        """How many clients a Ray of the run's own trains at once (its CPUs over
        ``client_cpus``; on a cluster, this host's CPUs stand for the cluster's)."""
        return max(1, self.cpus() // self.client_cpus)

    @field_validator("client_gpus")
    @classmethod
    def _placeable(cls, share: float) -> float:
        if 0 < share < RAY_RESOURCE_UNIT:
            raise ValueError(f"below {RAY_RESOURCE_UNIT}, the smallest share of a resource "
                             f"Ray places (0 trains clients on the CPU)")
        return share

    def verdict(self, rounds: int, failed: int) -> str:
        """Why a run with ``failed`` of ``rounds`` rounds not counted is a failure ("" if not)."""
        if failed == rounds:
            return f"no round counted ({failed} of {rounds} failed)"
        if failed > self.max_failed_round_fraction * rounds:
            return (f"{failed} of {rounds} rounds did not count, more than "
                    f"run.max_failed_round_fraction = {self.max_failed_round_fraction}")
        return ""


class ContinualSpec(Section):
    """``[continual]``: every client learns a stream of tasks of disjoint classes
    (``fedsparse/continual/streams.py``); task ``t`` is trained in rounds
    ``t * rounds_per_task + 1 .. (t + 1) * rounds_per_task``."""

    num_tasks: int = Field(5, ge=1)
    classes_per_task: int = Field(2, ge=1)
    rounds_per_task: int = Field(1, ge=1, description="rounds each task is trained")
    class_order: Literal["natural", "seeded", "per_client"] = Field(
        "natural", description="0..C-1; one seeded permutation; or one per client")

    def task_of(self, server_round: int) -> int:
        """The task trained in ``server_round`` (1-based)."""
        return (server_round - 1) // self.rounds_per_task

    def round_in_task(self, server_round: int) -> int:
        """0 for a task's first round."""
        return (server_round - 1) % self.rounds_per_task

    def task_ends(self, server_round: int) -> bool:
        return server_round % self.rounds_per_task == 0


# The ways a reply can be corrupted (clients/corruptions.py), each one that the server's
# checks know. These touch a reply's metrics or records, so they apply to any reply ...
ReplyCorruption = Literal[
    "num_examples_nan", "num_examples_inf", "num_examples_huge", "num_examples_negative",
    "num_examples_beyond", "metric_list", "metric_unknown", "round_stale", "record_extra",
    "record_missing"]
# ... and these touch its arrays, which only train replies carry.
ArrayCorruption = Literal[
    "bytes_garbage", "bytes_empty", "bytes_truncated", "header_huge", "header_shape",
    "values_nan", "values_inf", "values_huge", "wrong_dtype", "wrong_shape", "array_extra",
    "array_missing"]
Corruption = Literal[ReplyCorruption, ArrayCorruption]  # one flat Literal of all kinds
REPLY_CORRUPTIONS: tuple[str, ...] = typing.get_args(ReplyCorruption)
CORRUPTIONS: tuple[str, ...] = typing.get_args(Corruption)
FAULTS = ("crash", "hang", "corrupt", "unavailable")  # the fault categories, in draw order


class FaultSpec(Section):
    """``[faults]``: simulated faults of client calls (train and evaluate replies; never the
    server's own queries), drawn per call from ``seed``, the partition, the round and the
    phase (``clients/faults.py``). Simulation only: a run on a SuperLink refuses it."""

    seed: int = Field(ge=0, le=2**31 - 1, description="default: the scenario's seed")
    crash: float = Field(0.0, ge=0, le=1, description="the ClientApp raises")
    hang: float = Field(0.0, ge=0, le=1, description="the reply comes after the round's "
                                                     "timeout, by hang_extra_s")
    corrupt: float = Field(0.0, ge=0, le=1, description="the reply is corrupted, one of "
                                                        "corruptions drawn uniformly")
    unavailable: float = Field(0.0, ge=0, le=1, description="the node cannot be reached")
    hang_extra_s: float = Field(0.5, gt=0, description="how long after run.round_timeout_s "
                                                       "a hung client replies")
    corruptions: list[Corruption] = Field(
        default_factory=lambda: list(CORRUPTIONS), min_length=1)

    @model_validator(mode="after")
    def _one_fault_per_call(self) -> FaultSpec:
        total = sum(getattr(self, fault) for fault in FAULTS)
        if total > 1 + 1e-9:
            given = ", ".join(f"{fault} = {getattr(self, fault):g}" for fault in FAULTS)
            raise ValueError(f"faults.{' + faults.'.join(FAULTS)} = {total:g} ({given}): a call "
                             f"has at most one fault, so these probabilities sum to at most 1")
        return self

    @field_validator("corruptions")
    @classmethod
    def _corruptions_apply(cls, kinds: list[str]) -> list[str]:
        twice = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(map(repr, twice))} more than once; each kind "
                             f"is drawn with the same probability, so list it once")
        if not set(kinds) & set(REPLY_CORRUPTIONS):
            raise ValueError(f"an evaluate reply carries no arrays: list at least one kind "
                             f"that applies to any reply ({', '.join(REPLY_CORRUPTIONS)})")
        return kinds


class TrackingSpec(Section):
    """Where the run is recorded (MLflow)."""

    experiment: str = Field("fedsparse", min_length=1)
    log_model: bool = True
    tags: dict[str, str] = Field(default_factory=dict)
    flush_timeout_s: float = Field(30.0, ge=0, description="how long the end of a run waits "
                                                           "for MLflow to receive everything")


def _plugin_section(registry: Registry[Any], value: Any) -> Any:
    """Validate a plugin section against the params model of the plugin it names."""
    if not isinstance(value, dict):
        return value
    load_plugins()
    name = value.get(registry.key)
    if name is None:
        raise ValueError(f"missing key {registry.key!r}; allowed: {', '.join(registry.names())}")
    try:
        entry = registry.get(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    return entry.params.model_validate(value)


class Scenario(Section):
    """A complete, validated run description."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    description: str = ""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataSpec = Field(default_factory=DataSpec)
    model: SerializeAsAny[PluginParams]
    strategy: SerializeAsAny[PluginParams]
    client: SerializeAsAny[PluginParams]
    run: RunSpec = Field(default_factory=RunSpec)
    continual: ContinualSpec | None = None
    faults: FaultSpec | None = None
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="before")
    @classmethod
    def _faults_seed(cls, tree: Any) -> Any:
        """``faults.seed`` defaults to the scenario's seed, written out (so that the run
        records it)."""
        if isinstance(tree, dict) and isinstance(tree.get("faults"), dict) \
                and "seed" not in tree["faults"]:
            seed = tree.get("seed", cls.model_fields["seed"].default)
            return {**tree, "faults": {**tree["faults"], "seed": seed}}
        return tree

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> Any:
        return _plugin_section(MODELS, value)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> Any:
        return _plugin_section(STRATEGIES, value)

    @field_validator("client", mode="before")
    @classmethod
    def _client(cls, value: Any) -> Any:
        return _plugin_section(CLIENT_PROGRAMS, value)

    @model_validator(mode="after")
    def _program_speaks_the_strategy(self) -> Scenario:
        strategy = STRATEGIES.get(self.strategy.name).impl
        programs = getattr(strategy, "client_programs", ())
        if programs and self.client.program not in programs:
            raise ValueError(f"strategy {self.strategy.name!r} runs with client.program = "
                             f"{' or '.join(map(repr, programs))}, not {self.client.program!r}")
        return self

    @model_validator(mode="after")
    def _required_sections_are_there(self) -> Scenario:
        for section in (self.model, self.strategy, self.client):
            for needed in getattr(type(section), "requires_sections", ()):
                if getattr(self, needed) is None:
                    raise ValueError(f"{type(section).__name__.removesuffix('Params')} needs "
                                     f"a [{needed}] section")
        return self

    @model_validator(mode="after")
    def _sections_agree(self) -> Scenario:
        for section in (self.model, self.strategy, self.client):
            section.check_scenario(self)
        return self

    @model_validator(mode="after")
    def _minimums_reachable(self) -> Scenario:
        self.strategy.check_minimums(self.data.num_clients)
        return self

    @model_validator(mode="after")
    def _rounds_cover_the_tasks(self) -> Scenario:
        if self.continual is not None:
            needed = self.continual.num_tasks * self.continual.rounds_per_task
            if self.run.rounds != needed:
                raise ValueError(f"run.rounds = {self.run.rounds}: a continual run trains "
                                 f"continual.num_tasks x continual.rounds_per_task = {needed} "
                                 f"rounds")
        return self

    def refuse_deployment(self, source: str) -> None:
        """ScenarioError unless this scenario may run on a SuperLink: fault injection is for
        simulation only (on devices it would fault real clients' replies)."""
        if self.faults is not None:
            raise ScenarioError(source, [
                "faults: fault injection runs in simulation only, not on a SuperLink; remove "
                "the [faults] section (or --unset faults) to run this scenario on devices"])

    def simulated_nodes(self) -> int:
        """How many nodes a simulation of this scenario runs: as many as the clients one
        exchange contacts at once (those a round samples to train or to evaluate, at least
        one per actor), not one per client. A simulated node serves whichever partition an
        instruction names (``strategies/directory.py``), and Flower's Simulation Engine asks
        every node for a message every 0.1 s: with a node per client, 100,000 clients made
        each round cost 111 s instead of 2.5 s."""
        at_once = self.strategy.clients_at_once(self.data.num_clients)
        return min(self.data.num_clients, max(at_once, self.run.actors()))

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` ends with evaluation: every ``run.eval_every`` rounds,
        the last round, and the last round of every continual task."""
        return (server_round % self.run.eval_every == 0 or server_round == self.run.rounds
                or (self.continual is not None and self.continual.task_ends(server_round)))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with every default filled in (``None`` values left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """``{"data.alpha": 0.5, ...}``: the validated scenario as MLflow params."""
        return _flatten(self.to_dict())

    def fingerprint(self) -> str:
        """Short stable hash of the validated scenario."""
        canonical = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:12]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{path}."))
        elif isinstance(value, list | dict):
            flat[path] = json.dumps(value)
        else:
            flat[path] = value
    return flat


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` as its key path and value (parsed as TOML, bare words as strings)."""
    path, sep, raw = item.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ScenarioError("--set", [f"{item!r}: expected KEY=VALUE, e.g. client.lr=0.01"])
    try:
        return keys, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return keys, raw.strip()


def toml_literal(value: object) -> str:
    """A value as a TOML literal, as ``--set KEY=VALUE`` (and Flower's overrides) take it."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").strip()


def sweep_overrides(sweeps: Sequence[str]) -> list[list[str]]:
    """``--sweep KEY=[V1, V2, ...]`` (each a TOML array): the ``--set`` overrides of every
    combination of the swept values, the first key varying slowest (one empty list when
    nothing is swept)."""
    grids = []
    for item in sweeps:
        path, sep, raw = item.partition("=")
        try:
            values = tomllib.loads(f"v = {raw}")["v"] if sep else None
        except tomllib.TOMLDecodeError:
            values = None
        if not path.strip() or not isinstance(values, list) or not values:
            raise ScenarioError("--sweep", [f"{item!r}: expected KEY=[V1, V2, ...], a TOML "
                                            f"array of the values to run, e.g. "
                                            f"client.lr=[0.1, 0.01]"])
        grids.append([f"{path.strip()}={toml_literal(v)}" for v in values])
    return [list(combo) for combo in itertools.product(*grids)]


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as TOML, bare words as strings)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = tree
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ScenarioError("--set", [f"{'.'.join(keys)}: {key!r} is a value, "
                                              f"not a section"])
            node = child
        node[keys[-1]] = value
    return tree


def apply_unset(tree: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Remove ``section.key`` entries (``--unset``) from a scenario tree; each must be there."""
    for path in keys:
        *sections, last = path.strip().split(".")
        node: Any = tree
        for key in sections:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            where = f"[{'.'.join(sections)}]" if sections else "the top level"
            present = f" ({where} has: {', '.join(node)})" if isinstance(node, dict) else ""
            raise ScenarioError("--unset", [f"{path}: no such key in the scenario file{present}"])
        del node[last]
    return tree


def drop_stale_partition_keys(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """After an override of ``data.partition``, drop the data keys that applied only to the
    file's partition (a :class:`ScenarioNote` each), unless an override set them too."""
    overridden = {".".join(_parse_override(item)[0]) for item in overrides}
    data = tree.get("data")
    if "data.partition" not in overridden or not isinstance(data, dict):
        return tree
    for partition, key in PARTITION_KEYS.items():
        if key in data and partition != data["partition"] and f"data.{key}" not in overridden:
            warnings.warn(ScenarioNote(f"dropped data.{key} = {data.pop(key)!r} (it applies "
                                       f"only to partition = {partition!r})"), stacklevel=2)
    return tree


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(source, [f"not valid TOML: {err}"]) from None


def validate(tree: dict[str, Any], overrides: Sequence[str] = (), source: str = "<text>",
             unset: Sequence[str] = ()) -> Scenario:
    """Validate a scenario tree (less ``--unset`` keys, plus ``--set`` overrides) into a
    :class:`Scenario`."""
    tree = apply_overrides(apply_unset(tree, unset), overrides)
    tree = drop_stale_partition_keys(tree, overrides)
    try:
        return Scenario.model_validate(tree)
    except ValidationError as err:
        raise ScenarioError(source, [_describe(e, tree) for e in err.errors()]) from None


def parse_scenario(text: str, overrides: Sequence[str] = (), source: str = "<text>") -> Scenario:
    """Validate TOML text (plus ``--set`` overrides) into a :class:`Scenario`."""
    return validate(_toml(text, source), overrides, source)


def load_scenario(path: str | Path, overrides: Sequence[str] = (),
                  unset: Sequence[str] = ()) -> Scenario:
    """Read and validate a scenario file (following ``extends``), less the ``unset`` keys,
    plus ``overrides``."""
    return validate(read_tree(Path(path)), overrides, source=str(path), unset=unset)


def read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A scenario file as a tree; ``extends = "base.toml"`` (relative to the file) names a
    file whose keys this one overrides, section by section."""
    if not path.is_file():
        raise ScenarioError(str(path), [f"file not found ({path.resolve()})"])
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ScenarioError(str(path), [f"extends: a cycle ({chain})"])
    tree = _toml(_read_text(path), str(path))
    base = tree.pop("extends", None)
    if base is None:
        return tree
    return _merge(read_tree(_extends_target(path, base), (*seen, path.resolve())), tree)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ScenarioError(str(path), [f"not UTF-8 text: byte {err.object[err.start]:#04x} "
                                        f"at offset {err.start}"]) from None


def _extends_target(path: Path, base: Any) -> Path:
    """The file that ``extends = base`` in ``path`` names: a relative path to a .toml file."""
    if (not isinstance(base, str) or PurePath(base).is_absolute()
            or PurePath(base).suffix != ".toml" or (path.parent / base).is_dir()):
        raise ScenarioError(str(path), [f"extends = {base!r}: an extends target must be a "
                                        f"relative path to a .toml file"])
    target = path.parent / base
    if not target.is_file():
        raise ScenarioError(str(path), [f"extends = {base!r}: file not found "
                                        f"({target.resolve()})"])
    return target


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key, values replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(error: dict[str, Any], tree: dict[str, Any]) -> str:
    """One line per pydantic error: key, offending value, what is allowed."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<scenario>"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], tree)
        return f"{key}: unknown key (allowed in [{'.'.join(loc[:-1]) or 'top level'}]: {allowed})"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], dict):
        return f"{key} = {error['input']!r}: {message}"
    return f"{key}: {message}"


def _allowed_keys(section: list[str], tree: dict[str, Any]) -> str:
    """The keys allowed in the (possibly nested) section at ``section``."""
    registries = {"model": MODELS, "strategy": STRATEGIES, "client": CLIENT_PROGRAMS}
    candidates: list[type[BaseModel]] = [Scenario]
    for depth, part in enumerate(section):
        if depth == 0 and part in registries:
            registry = registries[part]
            candidates = [registry.get(tree.get(part, {}).get(registry.key)).params]
            continue
        if part not in candidates[0].model_fields:  # a tagged union member's tag
            candidates = [m for m in candidates if m.model_fields.get("name") and
                          m.model_fields["name"].default == part] or candidates
            continue
        field = candidates[0].model_fields[part]
        candidates = [t for t in _model_types(field.annotation)]
    return ", ".join(candidates[0].model_fields) if candidates else "?"


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (through Annotated, unions, Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _model_types(arg)]
