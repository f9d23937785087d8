"""Reference models, chosen by ``[model] name`` in a scenario.

Each model module registers a params model and a builder
``build(params, input_shape, num_classes) -> nn.Module`` in :data:`fedsparse.registry.MODELS`.
"""

from __future__ import annotations

from torch import nn

from fedsparse.models import cnn, mlp
from fedsparse.registry import MODELS, PluginParams

__all__ = ["build_model", "cnn", "mlp"]


def build_model(params: PluginParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model a scenario's ``[model]`` section names."""
    return MODELS.get(params.name).impl(params, input_shape, num_classes)
