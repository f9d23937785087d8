"""pFedGate's client (Chen et al., ICML 2023, Algorithm 1, client side;
``fedsparse/personal/pfedgate.py`` has the maths).

Train: receive the dense base model ``theta``, run ``local_epochs`` epochs of gated training
of ``theta`` and the client's gating layer under its budget ``s_i``, and send back only the
blocks of ``theta`` that were kept in at least one minibatch of the round: their block ids,
coded like the index sets of ``fedsparse/compress/indices.py``, and their values (plus the
model's buffers, if any, dense). The gating layer (weights and normalisation statistics) and
the momentum of both optimisers are client state (``fedsparse/client_state.py``) and never
leave the client;
``s_i`` follows from the scenario and is reported as the metric ``budget``. Every tensor's
first block is always sent (it is always kept), even by a client that trained no step.
Evaluate: the client's own gated sparse model on its local test split; with ``adapt-steps``
in the instruction (a novel client), first fit only the gating layer for that many
minibatches, the base model frozen, and never fine-tune (that fit serves this evaluation;
evaluation never changes a client's state).
pFedGate + fine-tuning (``finetune_epochs``, the counterpart of FedAvg + fine-tuning): first
``finetune_epochs`` epochs of gated training of the gating layer and the base model (or the
gating layer only), under the same budget; the tuned models are evaluated and dropped, so
training never sees them.
"""

from __future__ import annotations

import random
import time
from typing import Annotated, Any, Literal

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from clients.programs.base import ClientProgram
from fedsparse.client_state import ClientState
from fedsparse.compress import indices
from fedsparse.device import cpu_numpy
from fedsparse.metrics.sparse_flops import SparseFlops
from fedsparse.models import shared_state
from fedsparse.personal import (
    BlockPartition,
    BudgetRule,
    GatedLearner,
    GatedModel,
    GatingLayer,
    Solver,
)
from fedsparse.protocol import ADAPT_STEPS, METRICS, NUM_EXAMPLES, QUERY, UPDATE, derive_seed
from fedsparse.registry import CLIENT_PROGRAMS, PluginParams
from fedsparse.scenario import Scenario
from fedsparse.schema import SCENARIO_CONFIG, ReleaseChoice
from fedsparse.sparse import sparse_parameters
from fedsparse.training import batches, num_steps
from strategies.records import from_numpy

GATING, MOMENTUM = "pfedgate-gating", "pfedgate-momentum"
BLOCKS, VALUES, BUFFER_PREFIX = "blocks", "values", "buffer/"


class BudgetLevels(BaseModel):
    """Heterogeneous budgets drawn per client: ``levels[j]`` with probability ``weights[j]``."""

    model_config = SCENARIO_CONFIG
    levels: list[float] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _valid(self) -> BudgetLevels:
        if any(not 0 < s <= 1 for s in self.levels):
            raise ValueError(f"budget levels {self.levels}: each must be in (0, 1]")
        if self.weights is not None and (len(self.weights) != len(self.levels)
                                         or any(w < 0 for w in self.weights)
                                         or sum(self.weights) <= 0):
            raise ValueError(f"budget weights {self.weights}: one non-negative weight per "
                             f"level, not all zero")
        return self


def _budget_form(value: Any) -> str:
    """Which form of ``client.budget`` a value has, so that a bad one gets one error (its
    form is the tag in the error's location, e.g. ``client.budget.number``)."""
    if isinstance(value, list):
        return "list"
    return "table" if isinstance(value, dict | BudgetLevels) else "number"


Budget = Annotated[Annotated[float, Tag("number")] | Annotated[list[float], Tag("list")]
                   | Annotated[BudgetLevels, Tag("table")], Discriminator(_budget_form)]


class PFedGateParams(PluginParams):
    program: Literal["pfedgate"] = "pfedgate"
    lr: float = Field(0.1, gt=0, description="base model learning rate")
    lr_gating: float = Field(0.1, gt=0, description="gating layer learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float = Field(10.0, ge=0, description="gradient-norm clip per module (0: none)")
    batch_size: int = Field(128, ge=2)
    local_epochs: int = Field(1, ge=1)
    blocks_per_tensor: int = Field(5, ge=1, description="B: chunks per parameter tensor")
    budget: Budget = Field(
        1.0, description="s: fraction of parameters allowed; one value, one per client, or "
                         "{levels = [...], weights = [...]} drawn per client")
    solver: Solver = Field("greedy", description="knapsack solver: greedy or exact")
    budget_rule: BudgetRule = Field("exact", description="exact: kept blocks <= s; release: "
                                                         "the released code's capacity")
    gates: Literal["learned", "fixed"] = Field("learned", description="fixed: every gate is 1 "
                                                                     "(no gating layer)")
    gate_gradient: ReleaseChoice = Field(
        "fedsparse", description="fedsparse: blocks scaled by the clipped gate, gradient 1 "
                                 "(straight through); release: scaled by the unclipped gate, "
                                 "gradient 1 + g (the released code)")
    seperate_trans: bool = Field(False, description="the release's option (its spelling): a "
                                                    "second gating head scales the blocks; "
                                                    "needs gate_gradient = release")
    finetune_epochs: int = Field(0, ge=0, description="pFedGate + fine-tuning: local epochs of "
                                                      "gated training before each evaluation "
                                                      "(not kept)")
    finetune: Literal["all", "gating"] = Field("all", description="what fine-tuning trains: "
                                                                  "the gating layer and the "
                                                                  "base model, or the gating "
                                                                  "layer only")

    @model_validator(mode="after")
    def _budgets_in_range(self) -> PFedGateParams:
        values = self.budget if isinstance(self.budget, list) else \
            [self.budget] if isinstance(self.budget, float | int) else []
        if any(not 0 < s <= 1 for s in values):
            raise ValueError(f"client.budget = {self.budget}: each budget must be in (0, 1]")
        if self.seperate_trans and (self.gate_gradient, self.gates) != ("release", "learned"):
            raise ValueError(f'client.seperate_trans = true needs client.gate_gradient = '
                             f'"release" and client.gates = "learned", not '
                             f'{self.gate_gradient!r} and {self.gates!r}: its gates only pick '
                             f'blocks, and only the release\'s rule gives them a gradient')
        if self.finetune_epochs and self.finetune == "gating" and self.gates == "fixed":
            raise ValueError('client.finetune = "gating" needs a gating layer (gates = '
                             '"learned"); with gates = "fixed" use finetune = "all"')
        return self

    def check_scenario(self, scenario: Scenario) -> None:
        if isinstance(self.budget, list) and len(self.budget) != scenario.data.num_clients:
            raise ValueError(f"client.budget lists {len(self.budget)} values; give one per "
                             f"client (data.num_clients = {scenario.data.num_clients})")

    def budget_of(self, partition_id: int, seed: int) -> float:
        """``s_i`` of client ``partition_id``."""
        if isinstance(self.budget, list):
            return float(self.budget[partition_id])
        if isinstance(self.budget, BudgetLevels):
            rng = random.Random(derive_seed(seed, "budget", partition_id))
            return float(rng.choices(self.budget.levels, self.budget.weights)[0])
        return float(self.budget)


@CLIENT_PROGRAMS.register("pfedgate", PFedGateParams)
class PFedGateProgram(ClientProgram):
    Params = PFedGateParams
    params: PFedGateParams

    def __init__(self, scenario: Scenario, partition_id: int, state: ClientState) -> None:
        super().__init__(scenario, partition_id, state)
        self.budget = self.params.budget_of(partition_id, scenario.seed)

    def learner(self, content: RecordDict) -> GatedLearner:
        """The received base model behind this client's gating layer and optimisers."""
        p = self.params
        model = self.model_from(content)
        partition = BlockPartition(model, p.blocks_per_tensor)
        input_shape = tuple(self.data.x_train.shape[1:])
        gating = None
        if p.gates == "learned":
            with torch.random.fork_rng():  # the gating layer's initialisation: per client
                torch.manual_seed(derive_seed(self.scenario.seed, "gating", self.partition_id))
                gating = GatingLayer(input_shape, len(partition),
                                     p.seperate_trans).to(self.device)
            saved = self.state.get(GATING)
            if saved:
                gating.load_state_dict({k: torch.from_numpy(v) for k, v in saved.items()})
        gated = GatedModel(model, partition, self.budget, gating=gating, solver=p.solver,
                           rule=p.budget_rule, gradient=p.gate_gradient)
        learner = GatedLearner(gated, lr=p.lr, lr_gating=p.lr_gating, momentum=p.momentum,
                               weight_decay=p.weight_decay, grad_clip=p.grad_clip or None,
                               flops=SparseFlops(model, input_shape,
                                                 list(sparse_parameters(model))))
        self._load_momentum(learner)
        return learner

    def _load_momentum(self, learner: GatedLearner) -> None:
        saved = self.state.get(MOMENTUM)
        for prefix, optimizer, module in self._optimized(learner):
            for name, param in module.named_parameters():
                if f"{prefix}{name}" in saved:
                    optimizer.state[param]["momentum_buffer"] = \
                        torch.from_numpy(saved[f"{prefix}{name}"].copy()).to(param.device)

    @staticmethod
    def _optimized(learner: GatedLearner) -> list[tuple[str, torch.optim.Optimizer,
                                                         torch.nn.Module]]:
        pairs = [("model/", learner.optimizer, learner.gated.model)]
        if learner.gating_optimizer is not None:
            pairs.append(("gating/", learner.gating_optimizer, learner.gated.gating))
        return pairs

    def _save(self, learner: GatedLearner) -> None:
        """Keep the gating layer and both optimisers' momentum as client state."""
        if learner.gated.gating is not None:
            self.state.put(GATING, {k: cpu_numpy(v).copy()
                                    for k, v in learner.gated.gating.state_dict().items()})
        momentum = {}
        for prefix, optimizer, module in self._optimized(learner):
            for name, param in module.named_parameters():
                buffer = optimizer.state.get(param, {}).get("momentum_buffer")
                if buffer is not None:
                    momentum[f"{prefix}{name}"] = cpu_numpy(buffer).copy()
        self.state.put(MOMENTUM, momentum)

    def train(self, content: RecordDict) -> RecordDict:
        started = time.perf_counter()
        p, data = self.params, self.data
        learner = self.learner(content)
        steps = num_steps(len(data.x_train), p.batch_size, p.local_epochs, None)
        stats = learner.fit(data.x_train, data.y_train,
                            batches(len(data.x_train), p.batch_size, self.generator(content)),
                            steps, device=self.device)
        self._save(learner)
        partition = learner.gated.partition
        assert stats.active is not None
        params = dict(learner.gated.model.named_parameters())
        key, coded = indices.encode(np.flatnonzero(stats.active.numpy()), len(partition))
        update = {f"{BLOCKS}.{key}": coded,
                  VALUES: cpu_numpy(partition.flatten(params, stats.active)).astype(np.float32)}
        update |= {BUFFER_PREFIX + n: cpu_numpy(v) for n, v in
                   shared_state(learner.gated.model).items() if n not in params}
        metrics = {
            NUM_EXAMPLES: len(data.x_train), "train-loss": stats.loss,
            "train-steps": stats.steps, "train-examples": stats.examples,
            "train-flops": stats.flops, "train-dense-flops": stats.dense_flops,
            "budget": self.budget, "density": stats.density,
            "active-density": partition.kept_fraction(stats.active),
            "train-s": time.perf_counter() - started}
        return RecordDict({UPDATE: from_numpy(update), METRICS: MetricRecord(metrics)})

    def evaluate(self, content: RecordDict) -> RecordDict:
        """The personalised gated model on the local test split. A novel client (``adapt-steps``
        in the instruction) first fits its gating layer for that many minibatches and is
        never fine-tuned; with ``finetune_epochs`` any other client first fine-tunes a copy."""
        p, data = self.params, self.data
        learner = self.learner(content)
        config = self.config(content)
        stream = batches(len(data.x_train), p.batch_size, self.generator(content))
        if ADAPT_STEPS in config:  # a novel client: its gating layer only, never fine-tuning
            adapt = int(config[ADAPT_STEPS])
            if adapt and learner.gated.gating is not None:
                learner.fit(data.x_train, data.y_train, stream, adapt, train_model=False,
                            device=self.device)
        elif p.finetune_epochs:
            learner.fit(data.x_train, data.y_train, stream,
                        num_steps(len(data.x_train), p.batch_size, p.finetune_epochs, None),
                        train_model=p.finetune == "all", device=self.device)
        loss, accuracy, density = learner.evaluate(data.x_test, data.y_test, p.batch_size,
                                                   self.device)
        return RecordDict({METRICS: MetricRecord({
            NUM_EXAMPLES: len(data.x_test), "eval-loss": loss, "eval-acc": accuracy,
            "eval-density": density, "budget": self.budget})})

    def query(self, content: RecordDict) -> RecordDict:
        """``num-examples``: the size of the local training split (for all-client weights)."""
        asked = str(self.config(content).get(QUERY, ""))
        if asked != NUM_EXAMPLES:
            raise ValueError(f"query {asked!r}; pfedgate answers: {NUM_EXAMPLES!r}")
        return RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: len(self.data.x_train)})})
