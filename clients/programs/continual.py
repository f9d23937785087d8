"""A continual learner on a client: its own task stream, a rehearsal learner and SparCL's
client-side plugins (DGM, DDR), inside the mask the server sent (``strategies/sparse_fedavg.py``)
or dense (``fedavg``).

Round ``r`` trains task ``t = (r - 1) // rounds_per_task`` for ``local_epochs`` epochs, the
epochs ``k*E .. (k+1)*E - 1`` of that task (``k``: the round within the task), so the
schedules that count epochs within a task (DDR's removals) run as on a single device. What
outlives a round is client state (``fedsparse/client_state.py``): the replay buffer
(examples, labels, logits, count seen) and DDR's statistics and kept examples for the
current task. The learner's
optimiser is plain SGD re-created every round (SparCL re-creates it every task and uses no
momentum, so nothing is lost with momentum 0).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from pydantic import Field
from torch import nn

from clients.programs.base import ClientProgram
from fedsparse.client_state import ClientState
from fedsparse.continual import (
    DERPP,
    DataRemoval,
    GradientMasking,
    Learner,
    Naive,
    Replay,
    ReservoirBuffer,
    SparseHooks,
    TaskStream,
    class_order,
    train_epochs,
)
from fedsparse.continual.sparcl import EpochsResult
from fedsparse.data import dataset_shape
from fedsparse.device import cpu_numpy
from fedsparse.metrics.sparse_flops import SparseFlops
from fedsparse.protocol import (
    ARRAYS,
    FROZEN,
    METRICS,
    MODEL_SYNC,
    NUM_EXAMPLES,
    SERVER_ROUND,
    SIGNAL,
    SIGNAL_KIND,
    derive_seed,
)
from fedsparse.registry import CLIENT_PROGRAMS, PluginParams
from fedsparse.scenario import ContinualSpec, Scenario
from fedsparse.schema import ReleaseChoice
from fedsparse.sparse import Mask, sparse_parameters
from fedsparse.sparse.wire import decode_model, decode_positions, encode_values
from fedsparse.training import evaluate
from strategies.records import to_numpy

BUFFER, REMOVAL = "replay-buffer", "data-removal"


class ContinualParams(PluginParams):
    program: Literal["continual"] = "continual"
    requires_sections: ClassVar[tuple[str, ...]] = ("continual",)
    learner: Literal["naive", "er", "derpp"] = "derpp"
    lr: float = Field(0.03, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    local_epochs: int = Field(1, ge=1, description="epochs of the current task per round")
    buffer_size: int = Field(500, ge=1, description="reservoir capacity (er, derpp)")
    alpha: float = Field(0.1, ge=0, description="derpp: weight of the logit MSE")
    beta: float = Field(0.5, ge=0, description="derpp: weight of the buffer cross-entropy")
    cl_mask: bool = Field(True, description="current-batch loss sees the task's logits only")
    gradient_density: float | None = Field(
        None, gt=0, le=1, description="DGM: gradient entries kept per masked layer (off: None)")
    gradient_every: int = Field(30, ge=1, description="DGM: minibatches between mask updates")
    removal_fraction: float = Field(0.0, ge=0, lt=1, description="DDR: share of a task's "
                                                                 "examples removed (0: off)")
    removal_every: int = Field(5, ge=1, description="DDR: epochs between removals")
    removal_until: int = Field(20, ge=1, description="DDR: last epoch of the task to remove at")
    removal_split: ReleaseChoice = Field(
        "fedsparse", description="DDR: fedsparse splits round(f n) evenly over the removals; "
                                 "release removes int(round(f n) / (until / every)) at each")
    first_task_replay: ReleaseChoice = Field(
        "fedsparse", description="fedsparse: replay once the buffer holds examples (Mammoth); "
                                 "release: no replay while the first task trains (SparCL)")
    partial_batch: ReleaseChoice = Field(
        "fedsparse", description="an epoch's short last minibatch: fedsparse trains it, "
                                 "release skips it (SparCL)")

    def check_scenario(self, scenario: Any) -> None:
        epochs = scenario.continual.rounds_per_task * self.local_epochs
        if self.removal_fraction and not self.removal_every <= self.removal_until < epochs:
            raise ValueError(f"client.removal_every = {self.removal_every} and "
                             f"client.removal_until = {self.removal_until} must satisfy every <= "
                             f"until < {epochs}, the epochs of a task (continual.rounds_per_task"
                             f" x client.local_epochs): DDR would never remove otherwise")


@CLIENT_PROGRAMS.register("continual", ContinualParams)
class ContinualProgram(ClientProgram):
    Params = ContinualParams
    params: ContinualParams

    def __init__(self, scenario: Scenario, partition_id: int, state: ClientState) -> None:
        super().__init__(scenario, partition_id, state)
        assert scenario.continual is not None  # the scenario requires it
        self.spec: ContinualSpec = scenario.continual
        self.num_classes = dataset_shape(scenario.data).num_classes

    @property
    def stream(self) -> TaskStream:
        """This client's tasks: the natural order, one seeded order, or its own."""
        order = self.spec.class_order
        seed = {"natural": None, "seeded": derive_seed(self.scenario.seed, "class-order"),
                "per_client": derive_seed(self.scenario.seed, "class-order",
                                          self.partition_id)}[order]
        return TaskStream.split(class_order(self.num_classes, seed),
                                self.spec.classes_per_task, self.spec.num_tasks)

    def received(self, content: RecordDict) -> tuple[nn.Module, Mask | None]:
        """The model sent (dense, or masked values + positions) and its mask."""
        if MODEL_SYNC in content.array_records:  # fedavg with a compressed downlink
            return self.model_from(content), None
        model = self.build_model()
        template = {k: cpu_numpy(v) for k, v in model.state_dict().items()}
        state, masks = decode_model(to_numpy(content.array_records[ARRAYS]), template)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return model, (self.device_mask(masks) if masks else None)

    def device_mask(self, masks: dict[str, np.ndarray]) -> Mask:
        """Decoded masks as a :class:`Mask` on this client's device."""
        return Mask({n: torch.from_numpy(m).to(self.device) for n, m in masks.items()})

    def frozen(self, content: RecordDict, params: dict[str, nn.Parameter]) -> Mask | None:
        """Positions of finished tasks' weights inside the mask (parameter isolation)."""
        if FROZEN not in content.array_records:
            return None
        return self.device_mask(decode_positions(to_numpy(content.array_records[FROZEN]),
                                                 {n: cpu_numpy(p) for n, p in params.items()}))

    def learner(self, model: nn.Module, hooks: SparseHooks, generator: torch.Generator,
                buffer: ReservoirBuffer) -> Learner:
        p = self.params
        common = {"lr": p.lr, "momentum": p.momentum, "cl_mask": p.cl_mask, "hooks": hooks,
                  "generator": generator}
        if p.learner == "naive":
            return Naive(model, **common)
        if p.learner == "er":
            return Replay(model, buffer, **common)
        return DERPP(model, buffer, alpha=p.alpha, beta=p.beta, **common)

    def _buffer(self, input_shape: tuple[int, ...]) -> ReservoirBuffer:
        buffer = ReservoirBuffer(self.params.buffer_size, input_shape, self.num_classes,
                                 self.device)
        saved = self.state.get(BUFFER)
        if saved:
            buffer.load(saved)
        return buffer

    def _removal(self, task: int, n: int) -> DataRemoval | None:
        p = self.params
        if p.removal_fraction == 0.0:
            return None
        ddr = DataRemoval(n, fraction=p.removal_fraction, every=p.removal_every,
                          until=p.removal_until,
                          max_count=self.spec.rounds_per_task * p.local_epochs,
                          split=p.removal_split)
        saved = self.state.get(REMOVAL)
        if saved and int(saved["task"][0]) == task:
            ddr.load({k: v for k, v in saved.items() if k != "task"})
        return ddr

    def train(self, content: RecordDict) -> RecordDict:
        started = time.perf_counter()
        p, spec = self.params, self.spec
        server_round = int(self.config(content)[SERVER_ROUND])
        task, k = spec.task_of(server_round), spec.round_in_task(server_round)
        data, stream = self.data, self.stream
        idx = stream.select(data.y_train, task)
        if len(idx) == 0:
            raise ValueError(f"client {self.partition_id} holds no training example of task "
                             f"{task} (classes {stream.tasks[task]})")
        x, y = data.x_train[idx], data.y_train[idx]
        model, mask = self.received(content)
        params = sparse_parameters(model) if mask is None else \
            {n: dict(model.named_parameters())[n] for n in mask}
        dgm = GradientMasking(p.gradient_density, p.gradient_every) \
            if p.gradient_density is not None else None
        weight_mask = Mask.dense(params) if mask is None and dgm is not None else mask
        kind = str(self.config(content).get(SIGNAL_KIND, "none"))
        hooks = SparseHooks(params, weight_mask, dgm, self.frozen(content, params),
                            dense_momentum=p.momentum if kind == "momentum-dense" else None)
        generator = self.generator(content)
        buffer = self._buffer(tuple(data.x_train.shape[1:]))
        learner = self.learner(model, hooks, generator, buffer)
        learner.begin_task(stream.logit_mask(task, self.num_classes).to(self.device),
                           replay=task > 0 or p.first_task_replay == "fedsparse")
        ddr = self._removal(task, len(x))
        flops = SparseFlops(model, tuple(data.x_train.shape[1:]), list(params))
        result = train_epochs(learner, hooks, x, y, range(k * p.local_epochs,
                                                          (k + 1) * p.local_epochs),
                              batch_size=p.batch_size, generator=generator, flops=flops, ddr=ddr,
                              drop_last=p.partial_batch == "release", device=self.device)
        if p.learner != "naive":
            self.state.put(BUFFER, buffer.state())
        if ddr is not None:
            self.state.put(REMOVAL, {**ddr.state(), "task": np.array([task])})
        reply = RecordDict({METRICS: self.metrics(result, started)})
        state = {n: cpu_numpy(v) for n, v in model.state_dict().items()}
        masks = {} if mask is None else {n: cpu_numpy(m) for n, m in mask.items()}
        reply[ARRAYS] = ArrayRecord({n: Array(np.ascontiguousarray(v))
                                     for n, v in encode_values(state, masks).items()})
        if kind != "none":
            reply[SIGNAL] = self.signal(kind, learner, hooks, params, masks, x, y)
        return reply

    def signal(self, kind: str, learner: Learner, hooks: SparseHooks,
               params: dict[str, nn.Parameter], masks: dict[str, np.ndarray], x: torch.Tensor,
               y: torch.Tensor) -> ArrayRecord:
        """What the server's next mask update needs (see ``SIGNAL_KIND``)."""
        if kind == "grad":  # the last minibatch's (masked) gradient, as SparCL's TDM uses it
            grads = {n: cpu_numpy(p.grad if p.grad is not None else torch.zeros_like(p))
                     for n, p in params.items()}
            values = encode_values(grads, masks)
        elif kind == "grad-dense":  # RigL: the dense gradient of one fresh minibatch
            learner.optimizer.zero_grad(set_to_none=True)
            batch = torch.randperm(len(x), generator=learner.generator)[:self.params.batch_size]
            learner.current_loss(learner.model(x[batch].to(self.device)),
                                 y[batch].to(self.device)).backward()
            values = {n: cpu_numpy(p.grad) for n, p in params.items()}
        elif kind == "momentum-dense":  # SNFS: the momentum of the dense gradients
            values = {n: cpu_numpy(hooks.momentum[n]) for n in params}
        else:
            raise ValueError(f"signal-kind = {kind!r}; allowed: none, grad, grad-dense, "
                             f"momentum-dense")
        return ArrayRecord({n: Array(np.ascontiguousarray(v, np.float32))
                            for n, v in values.items()})

    def metrics(self, result: EpochsResult, started: float) -> MetricRecord:
        return MetricRecord({
            NUM_EXAMPLES: result.remaining,
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-examples": result.examples,
            "train-flops": result.flops,
            "train-dense-flops": result.dense_flops,
            "weight-density": result.weight_density,
            "grad-density": result.grad_density,
            "examples-removed": result.removed,
            "examples-remaining": result.remaining,
            "train-s": time.perf_counter() - started,
        })

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Class-IL accuracy on the local test examples of the tasks seen so far."""
        server_round = int(self.config(content)[SERVER_ROUND])
        seen = self.stream.seen_classes(self.spec.task_of(server_round))
        data = self.data
        keep = torch.isin(data.y_test, torch.tensor(seen))
        if not keep.any():
            raise ValueError(f"client {self.partition_id} holds no test example of the classes "
                             f"seen so far {seen}")
        model, _ = self.received(content)
        result = evaluate(model, data.x_test[keep], data.y_test[keep], device=self.device)
        return RecordDict({METRICS: MetricRecord({
            NUM_EXAMPLES: result.num_examples, "eval-loss": result.loss,
            "eval-acc": result.accuracy})})
