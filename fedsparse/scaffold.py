"""Stochastic controlled averaging: SCAFFOLD in its one-vector form, SCALLION and SCAFCOM.

Huang, Li & Li, "Stochastic Controlled Averaging for Federated Learning with Communication
Compression", ICLR 2024 (arXiv 2308.08165), on SCAFFOLD (Karimireddy et al., ICML 2020,
option II). The reading implemented is ../shared/ALGORITHMS.md section 1.2-1.4:

Client i, given the model x and the global control variate c (eta_l local step size, K
local steps, C a compressor, alpha the control scaling, beta the SCAFCOM momentum):

    y <- x;  for k = 1..K:  y <- y - eta_l (g_k(y) - c_i + c)          (local_steps)
    g_bar = (1/K) sum_k g_k                          (accumulated, not inferred from x - y)
    SCAFFOLD:  delta = g_bar - c_i                         c_i <- c_i + delta
    SCALLION:  delta = C(g_bar - c_i)                      c_i <- c_i + alpha delta
    SCAFCOM:   v_i <- (1 - beta) v_i + beta g_bar
               delta = C(v_i - c_i)                        c_i <- c_i + alpha delta
    upload delta (one vector: the reformulation halves SCAFFOLD's uplink)

Server, with the deltas of the S' clients whose replies it accepted (N clients in all):

    x <- x - gamma (c + (1/S') sum delta),   gamma = eta_g eta_l K
    c <- c + (alpha / N) sum delta                                     (server_update)

so that c = (1/N) sum_i c_i at all times. SCALLION(C = identity, alpha = 1) and
SCAFCOM(beta = 1, C = identity, alpha = 1) are SCAFFOLD exactly. Weights are uniform.

Alternative reading of SCAFCOM (``momentum_in_local_steps``): each local step moves along
``beta g_k + (1 - beta) v_i - c_i + c``; v_i is then updated from the round's mean gradient
as above. It also reduces to SCAFFOLD at beta = 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from fedsparse.compress import (
    CONTRACTIVE,
    UNBIASED,
    Compressor,
    CompressorConfig,
    Payload,
    of_kind,
)
from fedsparse.compress.identity import IdentitySpec
from fedsparse.compress.randk import RandKSpec
from fedsparse.compress.topk import TopKSpec
from fedsparse.device import CPU, cpu_numpy
from fedsparse.metrics.flops import Loss, StepFlops
from fedsparse.registry import StrategyParams

Variant = Literal["scaffold", "scallion", "scafcom"]


@dataclass(frozen=True)
class MessageRule:
    """How a client turns its round into a message (the part that differs per variant)."""

    variant: Variant
    compressor: CompressorConfig
    alpha: float = 1.0
    beta: float = 1.0
    momentum_in_local_steps: bool = False


class ScaffoldParams(StrategyParams):
    """SCAFFOLD in the one-vector form: dense float32 messages, no compression."""

    name: Literal["scaffold"] = "scaffold"
    global_lr: float = Field(1.0, gt=0, description="eta_g; gamma = eta_g * client.lr * K")
    audit: bool = Field(False, description="check c = mean c_i after every round (queries "
                                           "every client; not counted as traffic)")

    def rule(self) -> MessageRule:
        return MessageRule("scaffold", IdentitySpec())


class ScallionParams(ScaffoldParams):
    """SCALLION: an unbiased compressor and the control scaling alpha."""

    name: Literal["scallion"] = "scallion"  # type: ignore[assignment]
    alpha: float = Field(0.01, gt=0, le=1, description="control scaling, at most 1/(1+omega)")
    compressor: CompressorConfig = Field(default_factory=lambda: RandKSpec(ratio=0.01))

    @field_validator("compressor")
    @classmethod
    def _unbiased(cls, spec: CompressorConfig) -> CompressorConfig:
        return of_kind(spec, UNBIASED, "SCALLION", "an unbiased",
                       "; use scafcom for biased ones")

    @model_validator(mode="after")
    def _alpha_within_variance(self) -> ScallionParams:
        """SCALLION's control step needs alpha <= 1/(1+omega) (Huang et al. 2023, Thm. 1);
        rand-k has omega = d/k - 1, so alpha <= k/d. (QSGD's omega depends on d: unchecked.)"""
        if isinstance(self.compressor, RandKSpec) and self.alpha > self.compressor.ratio:
            raise ValueError(f"strategy.alpha = {self.alpha} exceeds 1/(1+omega) = "
                             f"{self.compressor.ratio} of rand-k at ratio "
                             f"{self.compressor.ratio}; the control variates would diverge")
        return self

    def rule(self) -> MessageRule:
        return MessageRule("scallion", self.compressor, alpha=self.alpha)


class ScafcomParams(ScaffoldParams):
    """SCAFCOM: a contractive (biased) compressor, local momentum beta, control scaling
    alpha."""

    name: Literal["scafcom"] = "scafcom"  # type: ignore[assignment]
    alpha: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.2, gt=0, le=1, description="momentum; 1 disables it")
    compressor: CompressorConfig = Field(default_factory=lambda: TopKSpec(ratio=0.01))
    momentum_in_local_steps: bool = Field(False, description="the alternative reading: "
                                          "local steps move along beta g + (1-beta) v_i")

    @field_validator("compressor")
    @classmethod
    def _contractive(cls, spec: CompressorConfig) -> CompressorConfig:
        return of_kind(spec, CONTRACTIVE, "SCAFCOM", "a contractive",
                       ": a rescaled one makes c_i diverge; use scallion for unbiased ones")

    def rule(self) -> MessageRule:
        return MessageRule("scafcom", self.compressor, self.alpha, self.beta,
                           self.momentum_in_local_steps)


def flat_parameters(model: nn.Module) -> np.ndarray:
    """The model's trainable parameters as one float32 vector (state_dict order)."""
    return cpu_numpy(nn.utils.parameters_to_vector(model.parameters())).astype(np.float32)


def set_flat_parameters(model: nn.Module, x: np.ndarray) -> None:
    with torch.no_grad():
        nn.utils.vector_to_parameters(torch.from_numpy(np.ascontiguousarray(x)),
                                      model.parameters())


@dataclass(frozen=True)
class LocalResult:
    g_bar: np.ndarray  # (1/K) sum_k g_k
    loss: float  # mean minibatch loss
    steps: int
    examples: int
    flops: int


def local_steps(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], loss: Loss,
                lr: float, shift: np.ndarray, grad_scale: float = 1.0,
                device: torch.device = CPU) -> LocalResult:
    """Plain SGD steps ``y <- y - lr (grad_scale * g_k + shift)`` on ``model`` (on
    ``device``, where each batch is moved), one per batch.

    ``shift`` is ``c - c_i`` for SCAFFOLD's corrected steps. ``g_bar``, the mean of the K
    stochastic gradients, is accumulated exactly (float64), not inferred from ``x - y``.
    """
    params = list(model.parameters())
    shift_t = torch.from_numpy(np.ascontiguousarray(shift, dtype=np.float32)).to(device)
    g_sum = torch.zeros_like(shift_t, dtype=torch.float64)
    flops = StepFlops(model, loss)
    steps, examples, loss_sum = 0, 0, 0.0
    model.train()
    for batch in batches:
        batch = tuple(t.to(device) for t in batch)
        for p in params:
            p.grad = None

        def step(batch: tuple[torch.Tensor, ...] = batch) -> torch.Tensor:
            value = loss(model, batch)
            value.backward()
            return value

        loss_sum += float(flops.run(batch, step).detach())
        g = torch.cat([p.grad.reshape(-1) for p in params])
        g_sum += g
        with torch.no_grad():
            y = nn.utils.parameters_to_vector(params)
            y -= lr * (grad_scale * g + shift_t)
            nn.utils.vector_to_parameters(y, params)
        steps += 1
        examples += len(batch[0])
    if steps == 0:
        raise ValueError("local_steps needs at least one batch")
    return LocalResult(cpu_numpy(g_sum / steps).astype(np.float32), loss_sum / steps, steps,
                       examples, flops.total)


@dataclass
class ControlState:
    """Client i's state between rounds: control variate c_i and (SCAFCOM) momentum v_i."""

    c_i: np.ndarray
    v_i: np.ndarray

    @classmethod
    def zeros(cls, d: int) -> ControlState:
        return cls(np.zeros(d, np.float32), np.zeros(d, np.float32))


@dataclass(frozen=True)
class Message:
    """What a client sends (``payload``), what the server will decode from it (``delta``),
    and the change to c_i that goes with it (``alpha * delta``)."""

    payload: Payload
    delta: np.ndarray
    c_i_step: np.ndarray


def step_direction(rule: MessageRule, state: ControlState,
                   c: np.ndarray) -> tuple[np.ndarray, float]:
    """``(shift, grad_scale)`` of the local steps: ``g - c_i + c``, or for SCAFCOM's
    alternative reading ``beta g + (1 - beta) v_i - c_i + c``."""
    if rule.momentum_in_local_steps:
        return ((1 - rule.beta) * state.v_i - state.c_i + c).astype(np.float32), rule.beta
    return (c - state.c_i).astype(np.float32), 1.0


def client_message(variant: Variant, g_bar: np.ndarray, state: ControlState,
                   compressor: Compressor, rng: np.random.Generator, alpha: float = 1.0,
                   beta: float = 1.0) -> Message:
    """The message of SCAFFOLD / SCALLION / SCAFCOM (updates ``state.v_i`` for SCAFCOM).

    ``c_i`` is not changed here: the caller applies ``c_i_step`` once the server has
    accepted the message, so that c = mean c_i holds even when a message is lost. A
    diverged round (``g_bar`` not finite) raises before ``state`` changes.
    """
    if not np.isfinite(g_bar).all():
        raise FloatingPointError("the local steps diverged: their mean gradient is not finite")
    if variant == "scafcom":
        state.v_i = ((1 - beta) * state.v_i + beta * g_bar).astype(np.float32)
        target = state.v_i - state.c_i
    else:
        target = g_bar - state.c_i
    payload, delta = compressor(target.astype(np.float32), rng)
    return Message(payload, delta, (alpha * delta).astype(np.float32))


def server_update(x: np.ndarray, c: np.ndarray, deltas: list[np.ndarray], num_clients: int,
                  gamma: float, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``x - gamma (c + mean delta)`` and ``c + (alpha / N) sum delta`` (uniform weights)."""
    if not deltas:
        return x, c
    total = np.sum(np.stack(deltas).astype(np.float64), axis=0)
    x_new = x - gamma * (c + total / len(deltas))
    c_new = c + (alpha / num_clients) * total
    return x_new.astype(np.float32), c_new.astype(np.float32)
