"""LeNet-style CNN (LeCun et al. 1998): two 5x5 conv + ReLU + 2x2 max-pool blocks, then an MLP.

Convolutions are padded ("same") so the network also fits 8x8 digits; on 28x28 MNIST the
feature map after the two blocks is 7x7.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt
from torch import nn

from fedsparse.models.mlp import dense_stack
from fedsparse.registry import MODELS, PluginParams


class CNNParams(PluginParams):
    name: Literal["cnn"] = "cnn"
    channels: list[PositiveInt] = Field(default_factory=lambda: [6, 16], min_length=1, max_length=3)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [120, 84])

    def check_scenario(self, scenario: Any) -> None:
        if scenario.data.dataset == "synthetic":
            raise ValueError("model.name = 'cnn' needs images, and data.dataset = 'synthetic' "
                             "gives vectors of data.synthetic.dimension features (allowed: "
                             "model.name = 'mlp')")


@MODELS.register("cnn", CNNParams)
def build(params: CNNParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels = [input_shape[0], *params.channels]
    features: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        features += [nn.Conv2d(c_in, c_out, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
    features.append(nn.Flatten())
    body = nn.Sequential(*features)
    if min(input_shape[1:]) < 2 ** len(params.channels):
        raise ValueError(f"model.channels = {params.channels}: too many pooling stages for "
                         f"input {input_shape}")
    with torch.no_grad():
        flat = body(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(body, *dense_stack([flat, *params.hidden], num_classes))
