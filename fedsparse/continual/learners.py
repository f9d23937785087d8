"""Continual learners: one short class each, whose ``observe`` is the whole training step.

In the style of Mammoth (Buzzega et al. 2020): ``observe(x, y)`` takes one minibatch of the
current task and does zero-grad, loss, backward, the sparsity hooks, the optimiser step and
any buffer update.

- :class:`Naive`: cross-entropy on the current batch only (the fine-tuning lower bound);
- :class:`Replay`: experience replay, + cross-entropy on a reservoir-buffer batch (ER);
- :class:`DERPP`: Dark Experience Replay++ (Buzzega et al. 2020, eq. 6): + ``alpha`` * MSE
  between the model's logits and the logits stored with a buffer batch, + ``beta`` *
  cross-entropy on a second, independent buffer batch; SparCL's weights alpha = 0.1,
  beta = 0.5 (ALGORITHMS.md §4.2).

With ``cl_mask`` the current-batch cross-entropy sees only the current task's logits
(the others set to -inf), as in SparCL's released recipe; replay terms see all logits. The
replay terms join the loss as soon as the buffer holds examples (Mammoth), unless the task
began with ``replay = False`` (SparCL's release replays only from the second task on).
Optimiser: plain SGD (SparCL: lr 0.03, no momentum, no weight decay), re-created per task.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from fedsparse.continual.buffer import ReservoirBuffer


class StepHooks(Protocol):
    """What sparsity plugins do inside a step (see ``continual/sparcl.py``)."""

    def after_backward(self) -> None: ...

    def after_step(self) -> None: ...


class NoHooks:
    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass


@dataclass(frozen=True)
class Step:
    loss: float
    logits: torch.Tensor  # the current batch's logits (detached), for data-removal statistics
    examples: int  # examples that went through forward and backward (current + replay)


class Learner(ABC):
    name: str

    def __init__(self, model: nn.Module, *, lr: float, momentum: float = 0.0,
                 cl_mask: bool = True, hooks: StepHooks | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        self.cl_mask = cl_mask
        self.hooks = hooks or NoHooks()
        self.generator = generator or torch.Generator().manual_seed(0)
        self.task_logits: torch.Tensor | None = None  # True on the current task's classes
        self.replay = True

    def begin_task(self, task_logits: torch.Tensor, *, replay: bool = True) -> None:
        """``task_logits``: True on the task's classes; ``replay``: whether replay terms join
        the loss while this task trains."""
        self.task_logits = task_logits
        self.replay = replay

    def current_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cl_mask and self.task_logits is not None:
            logits = logits.masked_fill(~self.task_logits, -math.inf)
        return F.cross_entropy(logits, y)

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.hooks.after_backward()
        self.optimizer.step()
        self.hooks.after_step()

    @abstractmethod
    def observe(self, x: torch.Tensor, y: torch.Tensor) -> Step:
        """One training step on a current-task minibatch."""


class Naive(Learner):
    name = "naive"

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> Step:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = self.current_loss(logits, y)
        self.step(loss)
        return Step(float(loss.detach()), logits.detach(), len(x))


class Rehearsal(Learner):
    """A learner with a reservoir buffer filled from the current task's batches."""

    def __init__(self, model: nn.Module, buffer: ReservoirBuffer, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.buffer = buffer

    @property
    def replaying(self) -> bool:
        return self.replay and len(self.buffer) > 0


class Replay(Rehearsal):
    name = "er"

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> Step:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = self.current_loss(logits, y)
        replayed = 0
        if self.replaying:
            bx, by, _ = self.buffer.sample(len(x), self.generator)
            loss = loss + F.cross_entropy(self.model(bx), by)
            replayed = len(bx)
        self.step(loss)
        self.buffer.add(x, y, logits.detach(), self.generator)
        return Step(float(loss.detach()), logits.detach(), len(x) + replayed)


class DERPP(Rehearsal):
    name = "derpp"

    def __init__(self, model: nn.Module, buffer: ReservoirBuffer, *, alpha: float = 0.1,
                 beta: float = 0.5, **kwargs) -> None:
        super().__init__(model, buffer, **kwargs)
        self.alpha, self.beta = alpha, beta

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> Step:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = self.current_loss(logits, y)
        replayed = 0
        if self.replaying:
            bx, _, blogits = self.buffer.sample(len(x), self.generator)
            loss = loss + self.alpha * F.mse_loss(self.model(bx), blogits)
            bx2, by2, _ = self.buffer.sample(len(x), self.generator)
            loss = loss + self.beta * F.cross_entropy(self.model(bx2), by2)
            replayed = len(bx) + len(bx2)
        self.step(loss)
        self.buffer.add(x, y, logits.detach(), self.generator)
        return Step(float(loss.detach()), logits.detach(), len(x) + replayed)
