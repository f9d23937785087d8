"""A text classifier fine-tuned with LoRA adapters through peft, optionally with SoRA gates.

``[model] name = "lora"``: a Hugging Face BERT sequence classifier loaded from a local path
(``base = "minilm"``, the pretrained all-MiniLM-L6-v2 of ``fedsparse/models/pretrained.py``)
or built from a small config with fixed random weights (``base = "tiny_bert"``, for fast
tests), wrapped by ``peft.get_peft_model`` with a ``LoraConfig`` from the scenario (rank,
alpha, dropout, target modules). peft freezes the base and keeps the classification head
trainable (``modules_to_save``).

What a federation shares is :meth:`LoRAClassifier.federated_state_dict`: the adapters
(``lora_A``, ``lora_B``), the head and the SoRA gates, never the frozen base weights (which
every party loads from the same local files).

SoRA (Ding et al., EMNLP 2023; ALGORITHMS.md §3.2): with ``sora = true`` each adapted module
gets a gate ``g`` on its rank dimension, ``B (g * (A x)) * scaling`` (a forward hook on
``lora_A``, so peft's layers stay as they are), initialised from a standard normal as in the
release (``sora_gate_init = "normal"``) or to ones (``"ones"``: not the release's, a deviation
offered because it starts SoRA at exactly the dense LoRA model, ``B (1 * (A x)) = B A x``).
:meth:`LoRAClassifier.pruned` removes the ranks whose gate is zero and folds the gate into
``B`` (``B' = B diag(g)``), giving a plain, smaller peft LoRA adapter with the same outputs
(``rank_pattern``; ``alpha_pattern`` keeps each module's scaling ``alpha / r``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from fedsparse.models.pretrained import minilm_path, quiet_transformers
from fedsparse.registry import MODELS, PluginParams

ADAPTER = "default"  # peft's adapter name
TINY_BERT_SEED = 20231  # the tiny base's fixed weights: the same in every process


class LoRAModelParams(PluginParams):
    name: Literal["lora"] = "lora"
    base: Literal["minilm", "tiny_bert"] = Field(
        "minilm", description="pretrained MiniLM, or a 2-layer random BERT for tests")
    rank: int = Field(8, ge=1, description="r")
    alpha: float = Field(16.0, gt=0, description="lora_alpha (scaling alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="lora_dropout")
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    sora: bool = Field(False, description="SoRA gates on the rank dimension")
    sora_gate_init: Literal["normal", "ones"] = Field(
        "normal", description="the gates' start: N(0, 1) as in the release, or ones (dense LoRA)")

    @model_validator(mode="after")
    def _gates_exist(self) -> LoRAModelParams:
        if self.sora_gate_init != "normal" and not self.sora:
            raise ValueError(f"model.sora_gate_init = {self.sora_gate_init!r} needs model.sora "
                             f"= true (without SoRA there are no gates)")
        return self


def base_model(base: str, num_classes: int):  # -> transformers.PreTrainedModel
    """The frozen backbone with a fresh classification head (initialised from torch's
    global RNG, so the scenario's seed decides it)."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
    )

    quiet_transformers()
    if base == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(
            str(minilm_path()), num_labels=num_classes)
    else:
        from fedsparse.models.pretrained import tokenizer

        config = BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=num_classes)
        with torch.random.fork_rng():
            torch.manual_seed(TINY_BERT_SEED)
            model = BertForSequenceClassification(config)
    nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
    nn.init.zeros_(model.classifier.bias)
    return model


def classify(peft_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a peft sequence classifier for token ids, padding (id 0) masked out of
    attention."""
    return peft_model(input_ids=input_ids, attention_mask=(input_ids != 0).long()).logits


class LoRAClassifier(nn.Module):
    """``forward(input_ids) -> logits``; padding (id 0) is masked out of attention."""

    def __init__(self, params: LoRAModelParams, num_classes: int) -> None:
        super().__init__()
        from peft import LoraConfig, TaskType, get_peft_model

        self.params = params
        self.num_classes = num_classes
        self.config = LoraConfig(task_type=TaskType.SEQ_CLS, r=params.rank,
                                 lora_alpha=params.alpha, lora_dropout=params.dropout,
                                 target_modules=list(params.target_modules))
        self.peft = get_peft_model(base_model(params.base, num_classes), self.config)
        self.gates = nn.ParameterDict()
        if params.sora:
            for name, layer in self.lora_layers().items():
                gate = nn.Parameter(torch.randn(params.rank) if params.sora_gate_init == "normal"
                                    else torch.ones(params.rank))
                self.gates[_key(name)] = gate
                layer.lora_A[ADAPTER].register_forward_hook(partial(_gated, self.gates,
                                                                    _key(name)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return classify(self.peft, input_ids)

    def lora_layers(self) -> dict[str, nn.Module]:
        """peft's LoRA layers by their module name inside the base model."""
        from peft.tuners.lora import LoraLayer

        inner = self.peft.base_model.model
        return {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}

    def gate(self, layer: str) -> nn.Parameter:
        return self.gates[_key(layer)]

    # -- what a federation shares -----------------------------------------------------------
    def federated_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """Adapters, head and gates: every trainable tensor, detached (no base weight)."""
        return OrderedDict((name, p.detach()) for name, p in self.named_parameters()
                           if p.requires_grad)

    def load_federated_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = set(self.federated_state_dict())
        if set(state) != expected:
            raise ValueError(f"LoRA state: missing {sorted(expected - set(state))}, "
                             f"unexpected {sorted(set(state) - expected)}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(torch.as_tensor(value))

    # -- SoRA pruning and export ------------------------------------------------------------
    def pruned(self) -> tuple[object, dict[str, torch.Tensor]]:
        """``(LoraConfig, peft state)`` of the plain LoRA adapter without the zero-gate ranks,
        each gate folded into its ``B``; modules with no rank left are not adapted."""
        from peft import LoraConfig

        r, alpha = self.params.rank, self.params.alpha
        ranks, state = {}, {}
        for name, layer in self.lora_layers().items():
            g = self.gate(name).detach()
            alive = g != 0
            kept = int(alive.sum())
            if kept == 0:
                continue
            ranks[name] = kept
            a = layer.lora_A[ADAPTER].weight.detach()[alive]
            b = layer.lora_B[ADAPTER].weight.detach()[:, alive] * g[alive]
            state[f"base_model.model.{name}.lora_A.weight"] = a.clone()
            state[f"base_model.model.{name}.lora_B.weight"] = b.clone()
        head = {n.replace(f".modules_to_save.{ADAPTER}", ""): p.detach().clone()
                for n, p in self.peft.named_parameters()
                if p.requires_grad and ".modules_to_save." in n}
        if not ranks:
            raise ValueError("every SoRA gate is zero: no adapter is left to export")
        config = LoraConfig(task_type=self.config.task_type, r=r, lora_alpha=alpha,
                            lora_dropout=self.params.dropout, target_modules=sorted(ranks),
                            rank_pattern=dict(ranks),
                            alpha_pattern={n: alpha * k / r for n, k in ranks.items()},
                            modules_to_save=list(self.peft.peft_config[ADAPTER].modules_to_save
                                                 or []))
        return config, {**state, **head}

    def save_adapter(self, directory: Path) -> list[Path]:
        """Save the adapter as a standard peft adapter (``PeftModel.from_pretrained`` loads
        it on the same base); with SoRA, the pruned plain-LoRA adapter. Returns the files."""
        from peft import get_peft_model, set_peft_model_state_dict

        directory.mkdir(parents=True, exist_ok=True)
        if not self.params.sora:
            self.peft.save_pretrained(str(directory))
        else:
            config, state = self.pruned()
            with torch.random.fork_rng():
                plain = get_peft_model(base_model(self.params.base, self.num_classes),
                                       copy.deepcopy(config))
            set_peft_model_state_dict(plain, state)
            plain.save_pretrained(str(directory))
        return sorted(p for p in directory.iterdir() if p.is_file())

    def rank_counts(self) -> dict[str, int]:
        """Non-zero gates per adapted module (the rank each would keep); all ranks without
        SoRA."""
        if not self.params.sora:
            return {name: self.params.rank for name in self.lora_layers()}
        return {name: int((self.gate(name) != 0).sum()) for name in self.lora_layers()}


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")


def _gated(gates: nn.ParameterDict, key: str, module: nn.Module, inputs: tuple,
           output: torch.Tensor) -> torch.Tensor:
    """The forward hook on ``lora_A``: its output scaled by the rank gates ``gates[key]``,
    looked up at every call (not captured), so that the model's own gate is used after
    ``model.to(device)`` (which may replace a parameter) and in a deep copy of the model (the
    CPU copy that counts FLOPs, ``metrics/flops.py``)."""
    return output * gates[key]


@MODELS.register("lora", LoRAModelParams)
def build(params: LoRAModelParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LoRAClassifier(params, num_classes)
