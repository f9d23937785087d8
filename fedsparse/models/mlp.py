"""Multi-layer perceptron: flatten, then Linear + ReLU per hidden layer, then a linear head.

The "2NN" of McMahan et al. 2017 (FedAvg) is ``hidden = [200, 200]``; ``hidden = []`` is
multinomial logistic regression, FedProx's model on Synthetic(alpha, beta) (Li et al. 2020).
The input size is the dataset's (``fedsparse.data.dataset_shape``).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

from pydantic import Field, PositiveInt
from torch import nn

from fedsparse.registry import MODELS, PluginParams


class MLPParams(PluginParams):
    name: Literal["mlp"] = "mlp"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [200, 200],
                                      description="[]: softmax regression")


@MODELS.register("mlp", MLPParams)
def build(params: MLPParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), *dense_stack([math.prod(input_shape), *params.hidden],
                                                     num_classes))


def dense_stack(widths: list[int], num_classes: int) -> list[nn.Module]:
    """Linear + ReLU between consecutive ``widths``, then a linear head to ``num_classes``."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return layers
