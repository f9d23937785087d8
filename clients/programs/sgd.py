"""Plain local SGD: FedAvg's ClientUpdate (McMahan et al. 2017, Algorithm 1).

Receive w, run E local epochs (or exactly K local steps) of minibatch SGD with batch size B
on the local training split, send back the local model and the measurements the server
accounts: number of examples, mean loss, steps, training FLOPs, wall time.

With ``finetune_epochs > 0`` a client evaluates a personalised model: the global model after
that many epochs of the same local SGD on its training split ("FedAvg + FT", the standard
personalisation baseline; the fine-tuned model is not sent back and not kept).
"""

from __future__ import annotations

import time
from typing import Literal

from flwr.app import RecordDict
from pydantic import Field, model_validator
from torch import nn

from clients.programs.base import ClientProgram
from fedsparse.protocol import ARRAYS, METRICS
from fedsparse.registry import CLIENT_PROGRAMS, PluginParams
from fedsparse.training import TrainResult, num_steps, train_sgd


class SGDParams(PluginParams):
    program: Literal["sgd"] = "sgd"
    lr: float = Field(0.05, gt=0, description="local learning rate")
    batch_size: int = Field(32, ge=1)
    local_epochs: int | None = Field(None, ge=1, description="E (default 1 if no local_steps)")
    local_steps: int | None = Field(None, ge=1, description="K: exactly K local steps")
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0, description="gradient-norm clip (0: none)")
    finetune_epochs: int = Field(0, ge=0, description="FedAvg + fine-tuning: local epochs of "
                                                       "SGD on the model before it is evaluated")

    @model_validator(mode="after")
    def _one_budget(self) -> SGDParams:
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError("give client.local_epochs or client.local_steps, not both")
        if self.local_epochs is None and self.local_steps is None:
            object.__setattr__(self, "local_epochs", 1)
        return self


@CLIENT_PROGRAMS.register("sgd", SGDParams)
class SGDProgram(ClientProgram):
    Params = SGDParams
    params: SGDParams

    def local_sgd(self, model: nn.Module, content: RecordDict, epochs: int | None = None
                  ) -> TrainResult:
        """E local epochs (or ``epochs``) or exactly K local steps of SGD on the local
        training split."""
        data, p = self.data, self.params
        steps = num_steps(len(data.x_train), p.batch_size, epochs or p.local_epochs,
                          None if epochs else p.local_steps)
        return train_sgd(model, data.x_train, data.y_train, lr=p.lr, batch_size=p.batch_size,
                         steps=steps, generator=self.generator(content), momentum=p.momentum,
                         weight_decay=p.weight_decay, grad_clip=p.grad_clip or None,
                         device=self.device)

    def evaluated_model(self, content: RecordDict) -> nn.Module:
        model = self.model_from(content)
        if self.params.finetune_epochs:
            self.local_sgd(model, content, epochs=self.params.finetune_epochs)
        return model

    def train(self, content: RecordDict) -> RecordDict:
        started = time.perf_counter()
        model = self.model_from(content)
        result = self.local_sgd(model, content)
        return RecordDict({ARRAYS: self.arrays(model),
                           METRICS: self.train_metrics(result, started)})
