"""Sparse federated LoRA: FLASC with a server optimiser, optional client error feedback and
SoRA rank gates (maths in ``fedsparse/lora/flasc.py`` and ``fedsparse/lora/sora.py``; client
in ``clients/programs/lora.py``).

Per round: the scheduled densities; the download ``P * M`` (global top-k of ``|P|`` over the
alive coordinates, or dense at density 1), with SoRA the alive ranks and their gates; the
replies' ``D_i`` (top-k at the upload density) are averaged uniformly over the clients that
replied (FLASC's mean over the sampled clients) into the pseudo-gradient of one server
optimiser step. With SoRA the global gates become ``mean_i g_i`` after the clients' threshold
step (``sora_threshold_rule``: the paper's ``T_xi`` or the release's rule) and a rank whose
gate is zero is pruned for the rest of the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from pydantic import Field

from fedsparse.compress.base import ValueDtype, expect_array
from fedsparse.lora.flasc import (
    ServerOptimizer,
    ServerOptimizerName,
    scheduled_density,
    sparsifier,
)
from fedsparse.lora.model import LoRAClassifier
from fedsparse.lora.sora import RankLayout, ThresholdRule, linear_schedule, threshold
from fedsparse.models import scenario_model
from fedsparse.payload import PayloadError
from fedsparse.protocol import (
    ADAPTER,
    CONFIG,
    DOWN_DENSITY,
    ERROR_FEEDBACK,
    GATES,
    RANKS,
    SORA_RULE,
    SORA_THRESHOLD,
    TOPK_COUNT,
    UP_DENSITY,
    UP_VALUE_DTYPE,
    UPDATE,
    VALUE_DTYPE,
    derive_seed,
)
from fedsparse.registry import STRATEGIES, StrategyParams
from fedsparse.scenario import Scenario
from fedsparse.schema import ReleaseChoice
from strategies.base import FedSparseStrategy, Reply
from strategies.records import Received, from_numpy, to_numpy

OPTIMIZER_PREFIX, ALIVE = "optimizer/", "alive"


class FlascParams(StrategyParams):
    name: Literal["flasc"] = "flasc"
    own_downlink: ClassVar[str] = "sends the adapter over its own download mask (down_density)"
    down_density: float = Field(1.0, gt=0, le=1, description="d_down at round 1")
    up_density: float = Field(1.0, gt=0, le=1, description="d_up at round 1")
    density_decay: float = Field(1.0, gt=0, le=1, description="densities x decay ...")
    decay_every: int = Field(1, ge=1, description="... every this many rounds")
    error_feedback: bool = Field(False, description="clients keep what top-k did not send")
    value_dtype: ValueDtype = Field("float32", description="values sent (both ways unless "
                                                           "up_value_dtype is set)")
    up_value_dtype: ValueDtype | None = Field(None, description="values uploaded, if not "
                                                                "value_dtype (intb with EF)")
    server_optimizer: ServerOptimizerName = "adamw"
    server_lr: float = Field(1e-3, gt=0, description="sgd at 1.0: plain averaging "
                                                          "(at down_density 1)")
    sora_threshold: float = Field(0.0, ge=0, description="SoRA: xi at round 1")
    sora_threshold_final: float | None = Field(None, ge=0, description="SoRA: xi at the last "
                                                                       "round (linear)")
    sora_threshold_rule: ThresholdRule = Field(
        "paper", description="SoRA's threshold step: paper (soft threshold T_xi) or release "
                             "(zero |g| < 2 xi, shrink the others by xi)")
    topk_count: ReleaseChoice = Field(
        "fedsparse", description="entries a top-k mask keeps: fedsparse round(d * n), release "
                                 "int(d * n) (FLASC's code)")

    def check_scenario(self, scenario: Any) -> None:
        if scenario.model.name != "lora":
            raise ValueError(f"strategy 'flasc' needs model.name = 'lora', not "
                             f"{scenario.model.name!r}")
        if (self.sora_threshold or self.sora_threshold_final) and not scenario.model.sora:
            raise ValueError("strategy.sora_threshold needs model.sora = true")
        if scenario.model.sora and (self.server_optimizer, self.server_lr) != ("sgd", 1.0):
            raise ValueError(f"model.sora = true needs server_optimizer = 'sgd' and server_lr "
                             f"= 1.0, not {self.server_optimizer!r} at {self.server_lr}: the "
                             f"gates are averaged, so the adapter must be too, or the gates' "
                             f"pruning would outrun the adapter's step")


@STRATEGIES.register("flasc", FlascParams)
class Flasc(FedSparseStrategy):
    Params = FlascParams
    params: FlascParams
    client_programs: ClassVar[tuple[str, ...]] = ("lora",)
    train_records: ClassVar[frozenset[str]] = frozenset({UPDATE, GATES})

    def __init__(self, params: FlascParams, scenario: Scenario) -> None:
        super().__init__(params, scenario)
        model = scenario_model(scenario)
        assert isinstance(model, LoRAClassifier)
        self.layout = RankLayout(model)
        self.optimizer = ServerOptimizer(params.server_optimizer, params.server_lr,
                                         self.layout.size)
        self.round_config: dict[str, Any] = {}
        self.download: dict[str, np.ndarray] = {}

    # -- schedule -----------------------------------------------------------------------
    def densities(self, server_round: int) -> tuple[float, float]:
        p = self.params
        return (scheduled_density(p.down_density, p.density_decay, p.decay_every, server_round),
                scheduled_density(p.up_density, p.density_decay, p.decay_every, server_round))

    def threshold(self, server_round: int) -> float:
        p = self.params
        final = p.sora_threshold if p.sora_threshold_final is None else p.sora_threshold_final
        return linear_schedule(p.sora_threshold, final, server_round, self.scenario.run.rounds)

    # -- train --------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        down, up = self.densities(server_round)
        p = self.params
        self.round_config = {DOWN_DENSITY: down, UP_DENSITY: up, VALUE_DTYPE: p.value_dtype,
                             UP_VALUE_DTYPE: p.up_value_dtype or p.value_dtype,
                             ERROR_FEEDBACK: p.error_feedback,
                             SORA_THRESHOLD: self.threshold(server_round),
                             SORA_RULE: p.sora_threshold_rule, TOPK_COUNT: p.topk_count}
        adapter, _ = self.layout.split(to_numpy(arrays))
        coords = self.layout.coordinates()
        rng = np.random.default_rng(derive_seed(self.scenario.seed, server_round, "download"))
        self.download = sparsifier(down, p.value_dtype, p.topk_count).compress(
            adapter[coords], rng)
        return super().configure_train(server_round, arrays,
                                       ConfigRecord({**config, **self.round_config}), grid)

    def train_instruction(self, partition_id: int, arrays: ArrayRecord,
                          config: ConfigRecord) -> RecordDict:
        content = RecordDict({ADAPTER: ArrayRecord({k: Array(v)
                                                    for k, v in self.download.items()}),
                              CONFIG: config})
        if self.layout.sora:
            _, gates = self.layout.split(to_numpy(arrays))
            content[GATES] = ArrayRecord({"g": Array(gates[self.layout.alive_gates()].copy())})
            content[RANKS] = ArrayRecord({"alive": Array(self.layout.bitmap())})
        return content

    def check_train_reply(self, received: Received) -> tuple[np.ndarray, np.ndarray]:
        """``(D_i over all coordinates, the client's gates)``."""
        coords = self.layout.coordinates()
        delta = np.zeros(self.layout.size, np.float32)
        upload = sparsifier(self.round_config[UP_DENSITY], self.round_config[UP_VALUE_DTYPE],
                            self.params.topk_count)
        delta[coords] = upload.decompress(received[UPDATE], int(coords.sum()))
        gates = np.zeros(self.layout.rank * len(self.layout.modules), np.float32)
        if self.layout.sora:
            alive = self.layout.alive_gates()
            gates[alive] = expect_array(received[GATES], "g", np.dtype(np.float32),
                                        int(alive.sum()))
        elif GATES in received:
            raise PayloadError(f"a {GATES!r} record, but the model has no SoRA gates")
        return delta, gates

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        adapter, gates = self.layout.split(self.current)
        pseudo_gradient = np.mean([r.decoded[0] for r in replies], axis=0)
        adapter = self.optimizer.step(adapter, pseudo_gradient)
        if self.layout.sora:
            mean = torch.from_numpy(np.mean([r.decoded[1] for r in replies], axis=0))
            gates = threshold(mean, self.round_config[SORA_THRESHOLD],
                              self.params.sora_threshold_rule).numpy()
            for i, m in enumerate(self.layout.modules):
                own = gates[i * self.layout.rank:(i + 1) * self.layout.rank]
                self.layout.alive[m] &= own != 0
            gates[~self.layout.alive_gates()] = 0.0
        adapter[~self.layout.coordinates()] = 0.0  # pruned ranks stay exactly zero
        return from_numpy(self.layout.join(adapter, gates))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics["down_density"] = self.round_config[DOWN_DENSITY]
        metrics["up_density"] = self.round_config[UP_DENSITY]
        metrics["ranks_alive"] = self.layout.ranks_alive()
        if self.layout.sora:  # SoRA's rank per module (ALGORITHMS.md §7)
            for m in self.layout.modules:
                metrics[f"ranks_alive/{m}"] = int(self.layout.alive[m].sum())
        metrics["adapter_coordinates"] = int(self.layout.coordinates().sum())
        return arrays, metrics

    # -- checkpoint -----------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**super().state_arrays(), ALIVE: self.layout.alive_gates().astype(np.uint8),
                **{OPTIMIZER_PREFIX + k: v for k, v in self.optimizer.state_arrays().items()}}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_state_arrays(arrays)
        if ALIVE in arrays:
            self.layout.load_bitmap(np.packbits(arrays[ALIVE].astype(bool)))
        self.optimizer.load_state_arrays({k[len(OPTIMIZER_PREFIX):]: v for k, v in arrays.items()
                                          if k.startswith(OPTIMIZER_PREFIX)})
