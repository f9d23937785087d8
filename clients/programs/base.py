"""What a client program is: the local procedure a ClientApp runs for one instruction.

A program is built for one client and one message: it gets the scenario, its partition id
and the client's persistent state (Flower's ``Context.state``, the only state that
survives between rounds: ClientApp objects are recreated for every message). It turns the
instruction's RecordDict into the reply's RecordDict; the maths it calls lives in
``fedsparse``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsparse.data import ClientData, client_data, load_dataset
from fedsparse.models import build_model
from fedsparse.protocol import ARRAYS, CONFIG, SERVER_ROUND, derive_seed
from fedsparse.registry import PluginParams
from fedsparse.scenario import Scenario


class ClientProgram(ABC):
    """Base class: data, model and seeding shared by every program."""

    Params: ClassVar[type[PluginParams]]

    def __init__(self, scenario: Scenario, partition_id: int, state: RecordDict) -> None:
        self.scenario = scenario
        self.params = scenario.client
        self.partition_id = partition_id
        self.state = state

    @property
    def data(self) -> ClientData:
        return client_data(self.scenario.data, self.scenario.seed, self.partition_id)

    def model_from(self, content: RecordDict) -> nn.Module:
        """The scenario's model with the weights the server sent."""
        dataset = load_dataset(self.scenario.data.dataset)
        model = build_model(self.scenario.model, dataset.input_shape, dataset.num_classes)
        model.load_state_dict(content.array_records[ARRAYS].to_torch_state_dict())
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
        return ArrayRecord(model.state_dict())

    @abstractmethod
    def train(self, content: RecordDict) -> RecordDict:
        """Local training on the instruction ``content``; returns the reply's content."""

    @abstractmethod
    def evaluate(self, content: RecordDict) -> RecordDict:
        """Local evaluation on the client's test split; returns the reply's content."""
