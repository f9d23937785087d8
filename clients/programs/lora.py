"""The client of sparse federated LoRA (``strategies/flasc.py``; FLASC's client update,
``fedsparse/lora/flasc.py``).

Train: receive ``P * M`` (the adapters and head over the download mask, compressed as the
server says) and, with SoRA, the alive ranks and their gates; train every adapter entry
densely for ``local_epochs``; upload the top ``up-density`` of ``D = P * M - P_i`` over the
alive coordinates (plus the residual of earlier rounds with error feedback, kept as client
state, which holds once the server counts the upload: ``fedsparse/client_state.py``) and the
gates dense. Pruned ranks are neither received, trained nor sent. Evaluate: the dense model
the server sends, on the local test split. The frozen base model never crosses the wire.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from pydantic import Field

from clients.programs.base import ClientProgram
from fedsparse.compress.base import expect_array
from fedsparse.device import cpu_numpy
from fedsparse.error_feedback import ef_message
from fedsparse.lora.flasc import sparsifier
from fedsparse.lora.model import LoRAClassifier
from fedsparse.lora.sora import RankLayout
from fedsparse.lora.training import GateRule, Optimizer, train_adapter
from fedsparse.protocol import (
    ADAPTER,
    DOWN_DENSITY,
    ERROR_FEEDBACK,
    GATES,
    METRICS,
    NUM_EXAMPLES,
    RANKS,
    SERVER_ROUND,
    SORA_RULE,
    SORA_THRESHOLD,
    TOPK_COUNT,
    UP_DENSITY,
    UP_VALUE_DTYPE,
    UPDATE,
    VALUE_DTYPE,
    derive_seed,
)
from fedsparse.registry import CLIENT_PROGRAMS, PluginParams
from fedsparse.training import num_steps
from strategies.records import to_numpy

STATE = "lora-ef"


def topk_count(config: Mapping[str, Any]) -> str:
    """The server's top-k count rule for this round's masks (``fedsparse`` before it sent one)."""
    return str(config.get(TOPK_COUNT, "fedsparse"))


class LoRAClientParams(PluginParams):
    program: Literal["lora"] = "lora"
    optimizer: Optimizer = Field("sgd", description="sgd (FLASC: momentum 0.9) or adamw")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0, description="gradient-norm clip over the adapters, "
                             "head and gates together (0: none; SoRA's release: 0.1)")
    batch_size: int = Field(16, ge=1)
    local_epochs: int = Field(1, ge=1)
    sora_l1: float = Field(0.0, ge=0, description="SoRA: eta, weight of mean |g| in the loss")
    gate_lr: float = Field(0.01, gt=0, description="SoRA: learning rate of the gates' AdamW")


@CLIENT_PROGRAMS.register("lora", LoRAClientParams)
class LoRAProgram(ClientProgram):
    Params = LoRAClientParams
    params: LoRAClientParams

    def received(self, content: RecordDict) -> tuple[LoRAClassifier, RankLayout, np.ndarray]:
        """The model as sent (``P * M``, alive gates), its layout and its adapter vector."""
        config = self.config(content)
        model = self.build_model()
        assert isinstance(model, LoRAClassifier)
        layout = RankLayout(model)
        if RANKS in content.array_records:
            layout.load_bitmap(content.array_records[RANKS]["alive"].numpy())
        coords = layout.coordinates()
        adapter = np.zeros(layout.size, np.float32)
        adapter[coords] = sparsifier(float(config[DOWN_DENSITY]), str(config[VALUE_DTYPE]),
                                     topk_count(config)).decompress(to_numpy(content.array_records[ADAPTER]),
                                                  int(coords.sum()))
        gates = np.zeros(layout.rank * len(layout.modules), np.float32)
        if layout.sora:
            alive = layout.alive_gates()
            gates[alive] = expect_array(to_numpy(content.array_records[GATES]), "g",
                                        np.dtype(np.float32), int(alive.sum()))
        state = layout.join(adapter, gates)
        model.load_federated_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return model, layout, adapter

    def train(self, content: RecordDict) -> RecordDict:
        started = time.perf_counter()
        p, data, config = self.params, self.data, self.config(content)
        server_round = int(config[SERVER_ROUND])
        model, layout, sent = self.received(content)
        sora = layout.sora
        rule = GateRule(p.sora_l1, float(config.get(SORA_THRESHOLD, 0.0)), p.gate_lr,
                        str(config.get(SORA_RULE, "paper"))) if sora else None
        with torch.random.fork_rng():  # dropout: seeded per client and round
            torch.manual_seed(derive_seed(self.scenario.seed, self.partition_id, server_round,
                                          "dropout"))
            result = train_adapter(
                model, layout, data.x_train, data.y_train, optimizer=p.optimizer, lr=p.lr,
                momentum=p.momentum, weight_decay=p.weight_decay, batch_size=p.batch_size,
                steps=num_steps(len(data.x_train), p.batch_size, p.local_epochs, None),
                generator=self.generator(content), gates=rule, grad_clip=p.grad_clip or None,
                device=self.device)
        trained, gates = layout.split({k: cpu_numpy(v) for k, v in
                                       model.federated_state_dict().items()})
        coords = layout.coordinates()
        residual = self.state.get(STATE).get("residual", np.zeros(layout.size, np.float32))
        rng = np.random.default_rng(derive_seed(self.scenario.seed, self.partition_id,
                                                server_round, "compress"))
        upload = sparsifier(float(config[UP_DENSITY]), str(config[UP_VALUE_DTYPE]),
                            topk_count(config))
        message = ef_message((sent - trained)[coords], residual[coords], upload, rng,
                             bool(config[ERROR_FEEDBACK]))
        if bool(config[ERROR_FEEDBACK]):
            kept = np.zeros(layout.size, np.float32)
            kept[coords] = message.residual
            self.state.put(STATE, {"residual": kept})
        reply = RecordDict({
            UPDATE: ArrayRecord({k: Array(v) for k, v in message.payload.items()}),
            METRICS: MetricRecord({
                NUM_EXAMPLES: len(data.x_train), "train-loss": result.loss,
                "train-steps": result.steps, "train-examples": result.examples,
                "train-flops": result.flops, "train-s": time.perf_counter() - started})})
        if sora:
            reply[GATES] = ArrayRecord({"g": Array(gates[layout.alive_gates()].copy())})
        return reply
