"""Local training of a LoRA classifier: the adapters and head with SGD (FLASC's clients:
momentum 0.9) or AdamW, and, with SoRA, the gates with their own AdamW and a proximal
threshold step after every step (``sora.py``). ``grad_clip`` clips the norm of the whole
gradient (adapters, head and gates together, the L1 term included) before both steps, as
SoRA's release does through the Hugging Face Trainer (``max_grad_norm`` 0.1 in its scripts).
Pruned ranks (``RankLayout``) get no gradient, so they stay exactly zero. The token ids stay
on the CPU; each minibatch is moved to the device the model is on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fedsparse.device import CPU
from fedsparse.lora.model import LoRAClassifier
from fedsparse.lora.sora import RankLayout, ThresholdRule, l1_penalty, threshold
from fedsparse.metrics.flops import StepFlops
from fedsparse.training import TrainResult, batches, cross_entropy

Optimizer = Literal["sgd", "adamw"]


@dataclass(frozen=True)
class GateRule:
    """SoRA's knobs: ``eta`` (L1 weight), ``xi`` (prox threshold), the gates' learning rate
    and which threshold step (``sora.threshold``)."""

    eta: float
    xi: float
    lr: float
    rule: ThresholdRule = "paper"


def parameter_groups(model: LoRAClassifier, weight_decay: float) -> list[dict]:
    """The trainable parameters but the SoRA gates: weights with ``weight_decay``, biases
    without (as SoRA's release groups them)."""
    trained = [(n, p) for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith("gates.")]
    return [{"params": [p for n, p in trained if not n.endswith(".bias")],
             "weight_decay": weight_decay},
            {"params": [p for n, p in trained if n.endswith(".bias")], "weight_decay": 0.0}]


def _optimizer(kind: Optimizer, groups: list[dict], lr: float,
               momentum: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def _mask_pruned(model: LoRAClassifier, layout: RankLayout) -> None:
    params = dict(model.named_parameters())
    for m in layout.modules:
        if layout.alive[m].all():
            continue
        dead = torch.from_numpy(~layout.alive[m]).to(params[layout.a_name[m]].device)
        for name, index in ((layout.a_name[m], (dead, slice(None))),
                            (layout.b_name[m], (slice(None), dead))):
            if params[name].grad is not None:
                params[name].grad[index] = 0.0
        if layout.sora and params[layout.gate_name[m]].grad is not None:
            params[layout.gate_name[m]].grad[dead] = 0.0


def train_adapter(model: LoRAClassifier, layout: RankLayout, x: torch.Tensor, y: torch.Tensor,
                  *, optimizer: Optimizer, lr: float, momentum: float, weight_decay: float,
                  batch_size: int, steps: int, generator: torch.Generator,
                  gates: GateRule | None = None, grad_clip: float | None = None,
                  device: torch.device = CPU) -> TrainResult:
    """``steps`` minibatch steps on ``(x, y)`` in place (``model`` on ``device``); the FLOPs
    counted are the task loss's (SoRA's L1 term is elementwise: no counted op)."""
    if len(x) == 0 or steps == 0:
        return TrainResult(steps=0, examples=0, loss=float("nan"), flops=0)
    opt = _optimizer(optimizer, parameter_groups(model, weight_decay), lr, momentum)
    gate_params = list(model.gates.values())
    gate_opt = torch.optim.AdamW(gate_params, lr=gates.lr, weight_decay=0.0) \
        if gates is not None and gate_params else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    flops = StepFlops(model, cross_entropy,
                      architecture=f"lora:{model.params.model_dump_json()}:{model.num_classes}")
    model.train()
    stream = batches(len(x), batch_size, generator)
    total, examples = 0.0, 0
    for _ in range(steps):
        idx = next(stream)
        batch = (x[idx].to(device), y[idx].to(device))

        def step(batch: tuple[torch.Tensor, ...] = batch) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            if gate_opt is not None:
                gate_opt.zero_grad(set_to_none=True)
            loss = cross_entropy(model, batch)
            penalty = l1_penalty(gate_params, gates.eta) \
                if gate_opt is not None and gates is not None and gates.eta else 0.0
            (loss + penalty).backward()
            return loss  # the task loss (reported without SoRA's L1 term)

        loss = flops.run(batch, step)
        _mask_pruned(model, layout)
        if grad_clip:
            nn.utils.clip_grad_norm_(trainable, grad_clip)
        opt.step()
        if gate_opt is not None and gates is not None:
            gate_opt.step()
            with torch.no_grad():
                for g in gate_params:
                    g.copy_(threshold(g, gates.xi, gates.rule))
        total += float(loss.detach())
        examples += len(idx)
    return TrainResult(steps=steps, examples=examples, loss=total / steps, flops=flops.total)
