"""Sparse FedAvg with one mask agreed on the server: the federated form of SparCL's TDM and of
dynamic sparse training (ALGORITHMS.md §4.3, §5.2).

Every client trains inside the same mask, so the average of their models is zero outside it
and the global model keeps the target sparsity by construction. The mask changes only on
the server, between rounds, on the schedule of the current task (``[continual]``; without
it the whole run is one task), from aggregated signals the clients sent in the round before:

- ``tdm``: SparCL's schedule over rounds within a task (``continual/tdm.py``): importance
  ``|w| + lambda * |g|`` of the global weights and the clients' mean last-minibatch gradient
  (their values at the mask: no extra positions), prune to the lower bound, regrow at random
  to the upper bound, mask frozen from round ``freeze_at`` of the task;
- ``dst``: drop ``rate * nnz`` smallest-|w| weights every ``update_every`` rounds (rate
  cosine-decayed over the task) and regrow as many by ``growth``: random, or the clients'
  mean dense gradient (RigL) or momentum (SNFS), which they send dense in the round before;
- ``fixed``: the initial mask throughout.

With ``isolation`` (Yildirim et al.'s parameter isolation, ``fedsparse/sparse/isolation.py``)
every task gets a fresh random mask; the weights of finished tasks' masks are frozen: the
clients zero their gradients (the frozen positions inside the current mask are sent with
the model) and the server copies them from its store instead of averaging, so they stay
bit-identical; task ``j`` is evaluated as ``store * mask_j`` (task identity picks the mask).

The initial mask: one-shot magnitude pruning of the initial model (SparCL), or random ERK /
uniform layer densities (Yildirim et al.). Downlink: masked weights as values plus coded
positions (``fedsparse/sparse/wire.py``); uplink: values at the mask only. Aggregation: the
sample-weighted mean over the clients that replied (FedAvg). With one client and one local
epoch per round this is SparCL's single-device per-epoch schedule exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from pydantic import Field, model_validator

from fedsparse.continual.tdm import TDMSchedule, tdm_update
from fedsparse.models import scenario_model
from fedsparse.payload import PayloadError, check_dense
from fedsparse.protocol import ARRAYS, CONFIG, FROZEN, SIGNAL, SIGNAL_KIND, derive_seed
from fedsparse.registry import STRATEGIES, StrategyParams
from fedsparse.scenario import Scenario
from fedsparse.sparse import (
    Growth,
    Mask,
    TaskIsolation,
    cosine_rate,
    drop_and_grow,
    erk_densities,
    sparse_parameters,
    uniform_densities,
)
from fedsparse.sparse.wire import decode_values, encode_model, encode_positions
from strategies.base import FedSparseStrategy, Reply
from strategies.records import Received, from_numpy, to_numpy

log = logging.getLogger("fedsparse.strategy")

MASK_PREFIX, SIGNAL_PREFIX = "mask/", "signal/"
STORE_PREFIX, TASK_MASK_PREFIX = "store/", "task-mask/"


class SparseFedAvgParams(StrategyParams):
    name: Literal["sparse_fedavg"] = "sparse_fedavg"
    own_downlink: ClassVar[str] = "already sends only the mask's values"
    sparsity: float = Field(0.75, ge=0, lt=1, description="fraction of masked weights at zero")
    init: Literal["magnitude", "erk", "uniform"] = "magnitude"
    dense_layers: list[str] = Field(default_factory=list,
                                    description="linear/conv modules left dense, e.g. ['5']")
    mask_update: Literal["tdm", "dst", "fixed"] = "tdm"
    update_every: int = Field(1, ge=1, description="rounds between mask updates in a task")
    freeze_at: int | None = Field(None, ge=1, description="tdm: round of the task the mask "
                                                          "freezes (default: its last round)")
    boost: float = Field(0.01, ge=0, lt=1, description="tdm: extra density at a task start")
    drop: float = Field(0.01, ge=0, lt=1, description="tdm: drop-and-grow fraction")
    importance_lambda: float = Field(0.5, ge=0, description="tdm: lambda in |w| + lambda|g|")
    growth: Growth = "random"
    drop_rate: float = Field(0.5, ge=0, le=1, description="dst: initial drop rate")
    final_drop_rate: float = Field(0.005, ge=0, le=1, description="dst: drop rate at task end")
    isolation: bool = Field(False, description="fresh random mask per task, old tasks' "
                                               "weights frozen (dst or fixed, erk or uniform)")

    @staticmethod
    def rounds_per_task(scenario: Any) -> int:
        """A task's rounds: the whole run without a [continual] section."""
        return scenario.continual.rounds_per_task if scenario.continual else scenario.run.rounds

    def freeze_round(self, rounds_per_task: int) -> int:
        """TDM's round of the task that freezes the mask (default: its last)."""
        return self.freeze_at or rounds_per_task - 1

    def check_scenario(self, scenario: Any) -> None:
        if self.mask_update != "tdm":
            return
        rounds = self.rounds_per_task(scenario)
        freeze = self.freeze_round(rounds)
        if not 1 <= freeze < rounds:
            raise ValueError(f"strategy.freeze_at = {freeze} must be a round of the task "
                             f"after its first, 1 to {rounds - 1} (continual.rounds_per_task = "
                             f"{rounds}): TDM boosts the mask in round 0 and freezes it there")

    @model_validator(mode="after")
    def _isolation_needs_fresh_masks(self) -> SparseFedAvgParams:
        if self.isolation and (self.mask_update == "tdm" or self.init == "magnitude"):
            raise ValueError("strategy.isolation = true needs mask_update = 'dst' or 'fixed' "
                             "and init = 'erk' or 'uniform' (a fresh random mask per task)")
        return self


@STRATEGIES.register("sparse_fedavg", SparseFedAvgParams)
class SparseFedAvg(FedSparseStrategy):
    Params = SparseFedAvgParams
    params: SparseFedAvgParams
    client_programs: ClassVar[tuple[str, ...]] = ("continual",)
    train_records: ClassVar[frozenset[str]] = frozenset({ARRAYS, SIGNAL})

    def __init__(self, params: SparseFedAvgParams, scenario: Scenario) -> None:
        super().__init__(params, scenario)
        if params.mask_update == "dst" and params.growth == "momentum" \
                and getattr(scenario.client, "momentum", 0.0) == 0.0:
            raise ValueError("strategy.growth = 'momentum' needs client.momentum > 0")
        self.names = list(sparse_parameters(scenario_model(scenario), params.dense_layers))
        if params.isolation and scenario.continual is None:
            raise ValueError("strategy.isolation = true needs a [continual] section")
        self.mask: Mask | None = None
        self.isolation: TaskIsolation | None = None
        self.signal: dict[str, torch.Tensor] | None = None  # clients' mean, for the next update
        self.requested = "none"  # the signal asked for in the current round
        self.fallback: ArrayRecord | None = None  # the round's model, if no client replies
        self.rounds_per_task = params.rounds_per_task(scenario)
        self.tdm = TDMSchedule(params.sparsity, update_every=params.update_every,
                               freeze_at=params.freeze_round(self.rounds_per_task),
                               boost=params.boost, drop=params.drop)

    # -- schedule -------------------------------------------------------------------------
    def _in_task(self, server_round: int) -> int:
        return (server_round - 1) % self.rounds_per_task

    def _updates_at(self, server_round: int) -> bool:
        k = self._in_task(server_round)
        if self.params.mask_update == "tdm":
            return self.tdm.bounds(k) is not None
        if self.params.mask_update == "dst":
            return k > 0 and k % self.params.update_every == 0
        return False

    def signal_kind(self, server_round: int) -> str:
        """What clients send in ``server_round`` for the mask update of the next round."""
        if server_round >= self.scenario.run.rounds or not self._updates_at(server_round + 1):
            return "none"
        if self.params.mask_update == "tdm":
            return "grad"
        return {"random": "none", "gradient": "grad-dense",
                "momentum": "momentum-dense"}[self.params.growth]

    # -- mask -----------------------------------------------------------------------------
    def _weights(self, state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(state[name].copy()) for name in self.names}

    def _initial_mask(self, weights: dict[str, torch.Tensor], task: int = 0) -> Mask:
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        density = 1.0 - self.params.sparsity
        if self.params.init == "magnitude":
            return Mask.magnitude(weights, uniform_densities(shapes, density))
        densities = (erk_densities if self.params.init == "erk" else uniform_densities)(
            shapes, density)
        generator = torch.Generator().manual_seed(
            derive_seed(self.scenario.seed, "mask-init", task))
        return Mask.random(weights, densities, generator)

    def _update_mask(self, server_round: int, weights: dict[str, torch.Tensor]) -> Mask:
        assert self.mask is not None
        generator = torch.Generator().manual_seed(
            derive_seed(self.scenario.seed, "mask", server_round))
        k = self._in_task(server_round)
        if self.params.mask_update == "tdm":
            lower, upper = self.tdm.bounds(k)
            grads = self.signal or {n: torch.zeros_like(w) for n, w in weights.items()}
            return tdm_update(self.mask, weights, grads, lower, upper,
                              self.params.importance_lambda, generator)
        rate = cosine_rate(k / self.rounds_per_task, self.params.drop_rate,
                           self.params.final_drop_rate)
        frozen = self.isolation.frozen() if self.isolation is not None else None
        return drop_and_grow(self.mask, weights, rate, self.params.growth, generator,
                             self.signal, None if frozen is None else frozen.masks)

    def _advance_mask(self, server_round: int) -> None:
        """Set up the mask for ``server_round``; zero the global weights outside it."""
        weights = self._weights(self.current)
        if self.mask is None:
            self.mask = self._initial_mask(weights)
            self.mask.apply(weights)
            if self.params.isolation:
                self.isolation = TaskIsolation(weights)
        elif self.isolation is not None and self._in_task(server_round) == 0:
            self.isolation.finish_task(self.mask, weights)
            self.mask = self._initial_mask(weights, len(self.isolation.task_masks))
            self.isolation.working_copy(self.mask, weights)
        if self._updates_at(server_round):
            self.mask = self._update_mask(server_round, weights)
            log.info("round %d: mask %s, density %.4f", server_round,
                     self.params.mask_update, self.mask.density())
        self.signal = None
        for name, w in weights.items():
            self.current[name] = w.numpy()

    def _masks_np(self) -> dict[str, np.ndarray]:
        assert self.mask is not None
        return {name: m.numpy() for name, m in self.mask.items()}

    # -- messages -------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = to_numpy(arrays)
        self._advance_mask(server_round)
        self.fallback = from_numpy(self.current)
        self.requested = self.signal_kind(server_round)
        config = ConfigRecord({**config, SIGNAL_KIND: self.requested})
        return super().configure_train(server_round, self.fallback, config, grid)

    def model_content(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.mask is None:
            return arrays
        return from_numpy(encode_model(to_numpy(arrays), self._masks_np()))

    def frozen(self) -> dict[str, np.ndarray]:
        """Positions inside the current mask that belong to finished tasks (isolation)."""
        frozen = self.isolation.frozen() if self.isolation is not None else None
        if frozen is None or self.mask is None:
            return {}
        return {name: (m & frozen[name]).numpy() for name, m in self.mask.items()}

    def train_instruction(self, partition_id: int, arrays: ArrayRecord,
                          config: ConfigRecord) -> RecordDict:
        content = RecordDict({ARRAYS: self.model_content(arrays), CONFIG: config})
        frozen = self.frozen()
        if frozen:
            content[FROZEN] = from_numpy(encode_positions(frozen))
        return content

    def check_train_reply(self, received: Received) -> Any:
        masks = self._masks_np()
        state = decode_values(received[ARRAYS], self.current, masks)
        kind = self.requested
        if kind == "none":
            if SIGNAL in received:
                raise PayloadError(f"a {SIGNAL!r} record this round did not ask for")
            return state, None
        signal = received[SIGNAL]
        reference = {name: self.current[name] for name in masks}
        if kind == "grad":
            return state, decode_values(signal, reference, masks)
        check_dense(signal, reference)
        return state, signal

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        return (arrays if arrays is not None else self.fallback), metrics

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        weights = np.array([r.num_examples for r in replies], np.float64)
        weights /= weights.sum()
        model = _weighted_mean([r.decoded[0] for r in replies], weights)
        if self.isolation is not None:  # frozen weights are copied, not averaged
            for name, m in self.frozen().items():
                model[name][m] = self.isolation.store[name].numpy()[m]
        if self.requested != "none":
            mean = _weighted_mean([r.decoded[1] for r in replies], weights)
            self.signal = {name: torch.from_numpy(v) for name, v in mean.items()}
        return from_numpy(model)

    def task_views(self, arrays: ArrayRecord) -> dict[int, ArrayRecord] | None:
        """With isolation: each finished task's subnetwork ``store * mask_j`` (shared
        unmasked parameters as now), and the current model for the current task."""
        if self.isolation is None:
            return None
        state = to_numpy(arrays)
        views = {j: from_numpy({**state, **{n: w.numpy() for n, w in
                                            self.isolation.task_weights(j).items()}})
                 for j in range(len(self.isolation.task_masks))}
        return {**views, len(self.isolation.task_masks): arrays}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round, self.model_content(arrays), config, grid)

    def after_round(self, server_round: int, arrays: ArrayRecord,
                    grid: Grid) -> dict[str, float]:
        assert self.mask is not None
        per_layer = {f"mask_density.{name}": d for name, d in self.mask.densities().items()}
        return {"mask_density": self.mask.density(), **per_layer}

    # -- checkpoint -----------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        out = super().state_arrays()
        if self.mask is not None:
            out |= {MASK_PREFIX + n: m.numpy().astype(np.uint8) for n, m in self.mask.items()}
        if self.signal is not None:
            out |= {SIGNAL_PREFIX + n: s.numpy() for n, s in self.signal.items()}
        if self.isolation is not None:
            out |= {STORE_PREFIX + n: w.numpy() for n, w in self.isolation.store.items()}
            for j, mask in enumerate(self.isolation.task_masks):
                out |= {f"{TASK_MASK_PREFIX}{j}/{n}": m.numpy().astype(np.uint8)
                        for n, m in mask.items()}
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        masks = {k[len(MASK_PREFIX):]: torch.from_numpy(v.astype(bool))
                 for k, v in arrays.items() if k.startswith(MASK_PREFIX)}
        signal = {k[len(SIGNAL_PREFIX):]: torch.from_numpy(v)
                  for k, v in arrays.items() if k.startswith(SIGNAL_PREFIX)}
        self.mask = Mask(masks) if masks else None
        self.signal = signal or None
        store = {k[len(STORE_PREFIX):]: torch.from_numpy(v)
                 for k, v in arrays.items() if k.startswith(STORE_PREFIX)}
        if store:
            self.isolation = TaskIsolation(store)
            tasks: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in arrays.items():
                if k.startswith(TASK_MASK_PREFIX):
                    j, name = k[len(TASK_MASK_PREFIX):].split("/", 1)
                    tasks.setdefault(int(j), {})[name] = torch.from_numpy(v.astype(bool))
            self.isolation.task_masks = [Mask(tasks[j]) for j in sorted(tasks)]


def _weighted_mean(states: list[dict[str, np.ndarray]], weights: np.ndarray
                   ) -> dict[str, np.ndarray]:
    """``sum_i w_i * state_i`` per tensor, summed in partition-id order, float32 out."""
    return {name: sum(w * s[name].astype(np.float64) for w, s in zip(weights, states, strict=True)
                      ).astype(np.float32) for name in states[0]}
