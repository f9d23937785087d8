"""Reference models, chosen by ``[model] name`` in a scenario.

Each model module registers a params model and a builder
``build(params, input_shape, num_classes) -> nn.Module`` in :data:`fedsparse.registry.MODELS`.
"""

from __future__ import annotations

from torch import nn

from fedsparse.models import cnn, mlp
from fedsparse.registry import MODELS, PluginParams
from fedsparse.scenario import Scenario

__all__ = ["build_model", "cnn", "mlp", "scenario_model"]


def build_model(params: PluginParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model a scenario's ``[model]`` section names."""
    return MODELS.get(params.name).impl(params, input_shape, num_classes)


def scenario_model(scenario: Scenario) -> nn.Module:
    """A fresh instance of a scenario's model, sized for its dataset."""
    from fedsparse.data import load_dataset

    data = load_dataset(scenario.data.dataset)
    return build_model(scenario.model, data.input_shape, data.num_classes)
