"""What a client program is: the local procedure a ClientApp runs for one instruction.

A program is built for one client and one message: it gets the scenario, its partition id
and the client's state as of the last round the server committed (``fedsparse/
client_state.py``: ``state.get(name)``; what it changes it stages with ``state.put(name,
arrays)``, and the ClientApp saves it as this round's state after a train instruction).
ClientApp objects are recreated for every message, so nothing else survives between rounds.
It turns the instruction's RecordDict into the reply's RecordDict; the maths it calls lives
in ``fedsparse``.

A program trains and evaluates on ``self.device`` (``fedsparse/device.py``: CUDA when the
scenario gives clients a GPU and the process sees one): its models live there, its data on
the CPU, moved a minibatch at a time; whatever it sends or saves as state leaves the device
through ``cpu_numpy`` (or Flower's own conversion of a torch state dict, which also moves
it to the CPU).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedsparse.client_state import ClientState
from fedsparse.data import ClientData, client_data
from fedsparse.device import client_device, cpu_numpy
from fedsparse.downlink import apply_sync
from fedsparse.flat import unflatten
from fedsparse.models import load_shared_state, scenario_model, shared_state
from fedsparse.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    MODEL_SYNC,
    NUM_EXAMPLES,
    SERVER_ROUND,
    derive_seed,
)
from fedsparse.registry import PluginParams
from fedsparse.scenario import Scenario
from fedsparse.training import evaluate


class LocalTraining(Protocol):
    """What a local training run reports (``training.TrainResult``, ``scaffold.LocalResult``)."""

    loss: float
    steps: int
    examples: int
    flops: int


PUBLIC_MODEL = "public-model"  # state: this client's copy of a compressed downlink's x_hat


class ClientProgram(ABC):
    """Base class: data, model and seeding shared by every program."""

    Params: ClassVar[type[PluginParams]]

    def __init__(self, scenario: Scenario, partition_id: int, state: ClientState) -> None:
        self.scenario = scenario
        self.params = scenario.client
        self.partition_id = partition_id
        self.state = state
        self.device = client_device(scenario.run.client_gpus)

    @property
    def data(self) -> ClientData:
        return client_data(self.scenario.data, self.scenario.seed, self.partition_id)

    def build_model(self) -> nn.Module:
        """A fresh instance of the scenario's model (initialised on the CPU, as on every
        device), on this client's device."""
        return scenario_model(self.scenario).to(self.device)

    def model_from(self, content: RecordDict) -> nn.Module:
        """The scenario's model with the weights the server sent: the dense model, or the
        public model of a compressed downlink, updated from the copy kept in the state."""
        model = self.build_model()
        if MODEL_SYNC not in content.array_records:
            load_shared_state(model, content.array_records[ARRAYS].to_torch_state_dict())
            return model
        template = {k: cpu_numpy(v) for k, v in shared_state(model).items()}
        x_hat = apply_sync(self.state.get(PUBLIC_MODEL).get("x_hat"),
                           {k: a.numpy() for k, a in content.array_records[MODEL_SYNC].items()},
                           sum(v.size for v in template.values()))
        self.state.put(PUBLIC_MODEL, {"x_hat": x_hat})
        load_shared_state(model, {k: torch.from_numpy(v)
                                  for k, v in unflatten(x_hat, template).items()})
        return model

    def generator(self, content: RecordDict) -> torch.Generator:
        """Randomness for this client in this round only: seeded by (seed, partition, round)."""
        server_round = int(self.config(content)[SERVER_ROUND])
        seed = derive_seed(self.scenario.seed, self.partition_id, server_round)
        return torch.Generator().manual_seed(seed)

    @staticmethod
    def config(content: RecordDict) -> ConfigRecord:
        return content.config_records.get(CONFIG, ConfigRecord())

    @staticmethod
    def arrays(model: nn.Module) -> ArrayRecord:
        return ArrayRecord(shared_state(model))

    def train_metrics(self, result: LocalTraining, started: float) -> MetricRecord:
        """The measurements every train reply carries (see ``strategies/base.py``)."""
        return MetricRecord({
            NUM_EXAMPLES: len(self.data.x_train),
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-examples": result.examples,
            "train-flops": result.flops,
            "train-s": time.perf_counter() - started,
        })

    @abstractmethod
    def train(self, content: RecordDict) -> RecordDict:
        """Local training on the instruction ``content``; returns the reply's content."""

    def evaluated_model(self, content: RecordDict) -> nn.Module:
        """The model a client evaluates: the one sent (a program may personalise it)."""
        return self.model_from(content)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Accuracy and loss of :meth:`evaluated_model` on the client's local test split."""
        data = self.data
        result = evaluate(self.evaluated_model(content), data.x_test, data.y_test,
                          device=self.device)
        return RecordDict({METRICS: MetricRecord({
            NUM_EXAMPLES: result.num_examples, "eval-loss": result.loss,
            "eval-acc": result.accuracy})})

    def query(self, content: RecordDict) -> RecordDict:
        """Answer a server query about this client's state (e.g. an audit)."""
        raise NotImplementedError(f"client program {self.scenario.client.program!r} answers "
                                  f"no queries")
