"""Registries: a scenario names a model, a strategy and a client program; these map names to code.

A new strategy joins by adding one file to ``strategies/`` that defines a params model (a
:class:`PluginParams` subclass) and decorates its class with ``STRATEGIES.register``; the
same holds for client programs in ``clients/programs/`` and models in ``fedsparse/models/``.
:func:`load_plugins` imports those packages so every registration has run before a
scenario is validated.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, Field, field_validator, model_validator

from fedsparse.compress import CONTRACTIVE, CompressorConfig, of_kind
from fedsparse.schema import SCENARIO_CONFIG

T = TypeVar("T")

PLUGIN_PACKAGES = ("fedsparse.models", "strategies", "clients.programs")


class PluginParams(BaseModel):
    """Parameters of a plugin section of a scenario (``[model]``, ``[strategy]``, ``[client]``).

    Subclasses add typed fields with defaults; unknown keys are rejected.
    """

    model_config = SCENARIO_CONFIG

    def check_scenario(self, scenario: Any) -> None:
        """Checks that need the rest of the scenario (a ``fedsparse.scenario.Scenario``);
        raise ``ValueError`` naming the keys involved."""


class StrategyParams(PluginParams):
    """A ``[strategy]`` section: client sampling, shared by all strategies."""

    name: str
    fraction_train: float = Field(1.0, gt=0, le=1, description="clients sampled per round")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="clients in federated eval")
    min_train_clients: int = Field(1, ge=1, description="floor on the clients sampled")
    min_evaluate_clients: int = Field(1, ge=1, description="floor on the clients sampled")
    min_train_replies: int = Field(1, ge=1, description="valid train replies a round needs "
                                                        "to count (else the model is unchanged)")
    min_evaluate_replies: int = Field(1, ge=1, description="valid evaluate replies federated "
                                                           "evaluation needs to be reported")
    max_abs_value: float = Field(1e6, gt=0, description="largest |value| a decoded reply may "
                                                        "hold; a larger one is rejected")
    downlink: CompressorConfig | None = Field(
        None, description="compress the model sent for training (fedsparse/downlink.py)")
    # Set by a strategy whose downlink is its own: why ``downlink`` does not apply to it.
    own_downlink: ClassVar[str] = ""

    @field_validator("downlink")
    @classmethod
    def _contractive_downlink(cls, spec: CompressorConfig | None) -> CompressorConfig | None:
        return None if spec is None else of_kind(
            spec, CONTRACTIVE, "the compressed downlink", "a contractive",
            ": it keeps its error on the server, so a rescaled one makes x_hat diverge from x")

    def training_pool(self, num_clients: int) -> int:
        """How many clients are sampled from (all, unless a strategy holds some out)."""
        return num_clients

    def sample_size(self, pool: int, phase: str) -> int:
        """Clients sampled for ``phase`` ("train" or "evaluate") from ``pool`` clients."""
        if phase == "train":
            return min(pool, max(self.min_train_clients, int(self.fraction_train * pool)))
        if self.fraction_evaluate == 0:
            return 0
        return min(pool, max(self.min_evaluate_clients, int(self.fraction_evaluate * pool)))

    def clients_at_once(self, num_clients: int) -> int:
        """The most clients one exchange of a round contacts (its training or its federated
        evaluation sample)."""
        pool = self.training_pool(num_clients)
        return max(self.sample_size(pool, "train"), self.sample_size(pool, "evaluate"))

    def check_minimums(self, num_clients: int) -> None:
        """The reply minimums must be reachable with the clients sampled per round."""
        pool = self.training_pool(num_clients)
        for phase, needed in (("train", self.min_train_replies),
                              ("evaluate", self.min_evaluate_replies)):
            sampled = self.sample_size(pool, phase)
            if sampled and needed > sampled:
                raise ValueError(f"strategy.min_{phase}_replies = {needed} exceeds the "
                                 f"{sampled} clients sampled per round (fraction_{phase} x "
                                 f"{pool} clients): no round could count")

    @model_validator(mode="after")
    def _downlink_applies(self) -> StrategyParams:
        if self.downlink is not None and self.own_downlink:
            raise ValueError(f"strategy.downlink: {self.name} {self.own_downlink}; leave "
                             f"downlink unset")
        return self


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation and the pydantic model of its parameters."""

    name: str
    params: type[PluginParams]
    impl: T


class Registry(Generic[T]):
    """Name -> (params model, implementation) for one kind of plugin."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind  # e.g. "strategy"
        self.key = key  # the scenario key that names the plugin, e.g. "name" or "program"
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type[PluginParams]) -> Callable[[T], T]:
        """Class/function decorator: register ``impl`` under ``name`` with its params model."""

        def decorate(impl: T) -> T:
            if name in self._entries and self._entries[name].impl is not impl:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, params, impl)
            return impl

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return self._entries[name]


MODELS: Registry[Any] = Registry("model", "name")
STRATEGIES: Registry[Any] = Registry("strategy", "name")
CLIENT_PROGRAMS: Registry[Any] = Registry("client program", "program")


@cache
def load_plugins() -> None:
    """Import every module of the packages whose modules register models, strategies and
    client programs."""
    for name in PLUGIN_PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{name}.{module.name}")
