"""Reference models, chosen by ``[model] name`` in a scenario.

Each model module registers a params model and a builder
``build(params, input_shape, num_classes) -> nn.Module`` in :data:`fedsparse.registry.MODELS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedsparse.lora import model as lora
from fedsparse.models import cnn, mlp
from fedsparse.registry import MODELS, PluginParams
from fedsparse.scenario import Scenario

__all__ = ["build_model", "cnn", "load_shared_state", "lora", "mlp", "scenario_model",
           "shared_state"]


def build_model(params: PluginParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model a scenario's ``[model]`` section names."""
    return MODELS.get(params.name).impl(params, input_shape, num_classes)


def scenario_model(scenario: Scenario) -> nn.Module:
    """A fresh instance of a scenario's model, sized for its dataset."""
    from fedsparse.data import dataset_shape

    shape = dataset_shape(scenario.data)
    return build_model(scenario.model, shape.input_shape, shape.num_classes)


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a federation exchanges of a model: its whole ``state_dict``, or, for a model with
    frozen pretrained weights (``federated_state_dict``, e.g. LoRA), only its trainable part."""
    if hasattr(model, "federated_state_dict"):
        return dict(model.federated_state_dict())
    return dict(model.state_dict())


def load_shared_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`shared_state` returned (strictly: the same names)."""
    if hasattr(model, "load_federated_state_dict"):
        model.load_federated_state_dict(dict(state))
    else:
        model.load_state_dict(dict(state))
